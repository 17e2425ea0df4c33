#!/usr/bin/env bash
# One device call that checks and measures the runtime on a GPU (about 10 minutes on an H100 with every step):
#   tests:   the kernel (Triton and CUDA), sampling, QuantLinear and fused-decode tests including the `cuda`-marked
#            ones (S2 shapes, CUDA graphs),
#   bench:   `s2conv bench` for every format (all linears) plus the codec and fish-speech's step (FISH=eager,compiled
#            adds its 4-8 minute compilation), eager sampling as the baseline for bf16/q4,
#   batch:   bf16 and q4 at batch 32,
#   kernels: the kernel-level comparison with cuBLAS, tinygemm, torchao and gemlite (`bench_kernels.py --libraries`).
# STEPS="tests bench" runs a subset, TESTS_K a pytest -k expression over the tests. Run from the repository root with the wheels of .whl installed (see the device
# notes); Markdown and JSON go to $OUT (default ./gpu_session_out). Each step runs even when an earlier one failed;
# the exit status is the worst.
set -uo pipefail
out="${OUT:-gpu_session_out}"
steps="${STEPS:-tests bench batch kernels}"
mkdir -p "$out"
status=0
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ " $steps " == *" tests "* ]]; then
    python3 -m pytest -q -p no:cacheprovider -m "cuda or not cuda" -k "${TESTS_K:-not nothing}" tests/test_kernels.py \
        tests/test_cuda_int.py tests/test_cuda_frag.py tests/test_sampling_kernel.py tests/test_qlinear.py tests/test_fused_decode.py \
        tests/test_batch_fused.py \
        2>&1 | tail -15 || status=1
fi
if [[ " $steps " == *" bench "* ]]; then
    S2CONV_FUSED_SAMPLING=0 python3 -m s2conv.bench --formats bf16,q4 --targets all --frames 100 --no-codec --fish-speech none \
        --json "$out/bench_eager_sampling.json" 2>&1 | grep -E "fps|GPU:|HBM:" | sed 's/^/eager sampling: /' || status=1
    python3 -m s2conv.bench --formats bf16,fp8,q8,q8_0,q4,q4_k,q3,q2 --targets all --frames 100 --fish-speech "${FISH:-eager}" \
        --results "$out/results.md" --json "$out/bench_all.json" 2>&1 | grep -v -i warn || status=1
fi
if [[ " $steps " == *" batch "* ]]; then
    python3 -m s2conv.bench --formats bf16,q4 --targets all --frames 64 --batch 32 --no-codec --fish-speech none \
        --results "$out/results_batch.md" --json "$out/bench_batch.json" 2>&1 | grep -v -i warn || status=1
fi
if [[ " $steps " == *" kernels "* ]]; then
    timeout 240 python3 scripts/bench_kernels.py --formats q4,q8,fp8,q2 --m 1 --no-tune --libraries --budget-s 150 \
        2>&1 | grep -v -i warn | tail -40 || status=1
fi
exit $status
