"""Benchmark `s2conv export` on the `full` synthetic checkpoint (S2 Pro shapes): each S2 format, q8_0 and q4_k_m,
beside a plain f16 export in the same run. Prints wall time, file size and peak RSS per export.

    python scripts/bench_export.py [--ckpt DIR] [--out DIR] [--types fp8,q8,...] [--threads 2]

Generating the full checkpoint takes several minutes and ~10 GB of disk; it is reused when DIR exists.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TYPES = "f16,fp8,q8,q4,q3,q2,q8_0,q4_k_m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("bench/full-ckpt"))
    ap.add_argument("--out", type=Path, default=Path("bench/export"))
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.ckpt / "config.json").exists():
        from s2conv.checkpoint import make_checkpoint

        t0 = time.perf_counter()
        make_checkpoint("full", args.ckpt, seed=0, progress=True)
        print(f"generated {args.ckpt} in {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'type':<8} {'seconds':>8} {'GB':>7} {'peak RSS GB':>12}")
    for t in args.types.split(","):
        out = args.out / f"s2-pro-{t}.gguf"
        cmd = [sys.executable, "-m", "s2conv", "export", str(args.ckpt), "--type", t, "-o", str(out), "--force",
               "--quiet", "--no-tokenizer-json", "--threads", str(args.threads)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode:
            print(f"{t:<8} failed: {r.stderr.strip()}", flush=True)
            continue
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # max over children so far, KiB -> GB
        print(f"{t:<8} {dt:>8.1f} {out.stat().st_size / 1e9:>7.3f} {rss:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
