#!/usr/bin/env bash
# Alternate `s2conv bench` between a base copy of the package and this working tree, in one device call (same card,
# same warm machine), ROUNDS times (default 2); the arguments go to `s2conv bench`, lines come out prefixed BASE/NEW:
#   BASE=_base scripts/bench_ab.sh --formats q4,q2 --targets all --frames 100 --no-codec --fish-speech none
# Make the base copy where the git history is, before the device call (it travels as an untracked folder; delete
# it afterwards):   rm -rf _base && mkdir _base && git archive main s2conv | tar -x -C _base
# The base runs from inside its folder: `python -m` puts the working directory first on sys.path, so from the
# repository root it would import this tree's package instead.
# Or alternate environment settings of this tree instead (no base copy), one per ';'-separated entry:
#   ENVS='S2CONV_PDL_FENCE=0;S2CONV_PDL_FENCE=1' scripts/bench_ab.sh --formats q4 --targets all --frames 100 ...
set -uo pipefail
base="${BASE:-_base}"
rounds="${ROUNDS:-2}"
root="$PWD"
pick() { grep -E 'ms/frame|frames/s aggregate' | cut -c1-110; }
if [[ -n "${ENVS:-}" ]]; then
    IFS=';' read -r -a settings <<< "$ENVS"
    for r in $(seq "$rounds"); do
        for setting in "${settings[@]}"; do
            read -r -a assignments <<< "$setting"
            env "${assignments[@]}" python3 -m s2conv.bench "$@" 2>&1 | pick | awk -v p="$setting $r " '{print p $0}'
        done
    done
    exit 0
fi
[[ -d "$base/s2conv" ]] || { echo "bench_ab: no base package at $base/s2conv (see the header)" >&2; exit 2; }
for r in $(seq "$rounds"); do
    (cd "$base" && PYTHONPATH="$root/$base${PYTHONPATH:+:$PYTHONPATH}" python3 -m s2conv.bench "$@" 2>&1 | pick \
        | sed "s/^/BASE $r /")
    python3 -m s2conv.bench "$@" 2>&1 | pick | sed "s/^/NEW  $r /"
done
