"""Compiling ahead: a dry run notes the Triton launches of a prefill and a frame without running them, and leaves the
model generating exactly what it generated before (on CPU through triton's interpreter, small shapes)."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.bench import quantize_model  # noqa: E402
from s2conv.runtime import fused_decode  # noqa: E402
from s2conv.runtime.dual_ar import DualARTransformer  # noqa: E402
from s2conv.runtime.frame_loop import generate_frames  # noqa: E402
from s2conv.runtime.kernels import KERNELS, REPACK  # noqa: E402
from s2conv.runtime.kernels.launch import (compile_launches, distinct_launches, early_pdl, launch_early,  # noqa: E402
                                          pdl_args, recording)
from s2conv.runtime.qlinear import QuantLinear  # noqa: E402
from s2conv.runtime.sampling import SamplingParams  # noqa: E402
from s2conv.runtime.warmup import compile_kernels, record_launches  # noqa: E402
from test_runtime_math import TINY, _force_eos_at, random_prompt, random_s2_weights  # noqa: E402


GEMVS = {"int_gemv_kernel", "s2_int_gemv"}  # the Triton q4 GEMV, the CUDA one (kernels/cuda_int.py)


def _q4_linear(n=48, k=512):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // 128, generator=g) * 0.01 + 1e-3
    packed = {name: t.to(DEVICE) for name, t in REPACK["q4"](codes, scales).items()}
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    return x, packed


def test_recording_notes_launches_instead_of_running_them():
    x, packed = _q4_linear()
    want = KERNELS["q4"](x, packed)
    assert want.abs().max() > 0
    with recording() as noted:
        with recording() as inner:  # nested: the inner block notes its own launches only
            KERNELS["q4"](x, packed)
        got = KERNELS["q4"](x, packed)
    assert len(inner) == 1 and len(noted) == 1
    kernel, grid, args, kwargs = noted[0]
    # the Triton GEMV, or on a GPU with NVRTC the CUDA one (kernels/cuda_int.py): 3 tiles of 16 rows either way
    assert kernel.__name__ in GEMVS and grid[0] == 3
    assert kernel.__name__ == "s2_int_gemv" or kwargs["BITS"] == 4
    assert torch.equal(got, torch.zeros_like(want))  # the output it would have written reads as zeros
    assert torch.equal(KERNELS["q4"](x, packed), want)  # after the block, launches run again
    if DEVICE == "cpu":
        assert compile_launches(noted) == 0  # the interpreter compiles nothing


def test_a_dry_run_notes_both_forms_of_an_early_launch():
    """A kernel that waits late (PDL 3) goes out with PDL only inside a capture, and launch_pdl is a compile option:
    compiling ahead must compile both forms, or the first captured frame would compile one while it synthesizes."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    kernel = Kernel()
    with recording() as noted:
        launch_early(kernel, (2,), 1, PDL=3)
        launch_early(kernel, (2,), 1, PDL=2)  # any other mode: noted once, as given
    assert [n[3] for n in noted] == [{"PDL": 3, "launch_pdl": True}, {"PDL": 3}, {"PDL": 2}]
    assert not calls
    if DEVICE == "cpu":  # not Hopper: no early mode, and no PDL launch outside a capture
        assert early_pdl(torch.device("cpu")) == pdl_args(torch.device("cpu"))
        launch_early(kernel, (2,), 1, PDL=2)
        assert calls == [((2,), (1,), {"PDL": 2})]


@pytest.fixture(scope="module")
def q4_model():
    model = DualARTransformer.from_weights(TINY, random_s2_weights(TINY), torch.bfloat16, device=DEVICE)
    quantize_model(model, "q4", "all")
    for q in model.modules():
        if isinstance(q, QuantLinear):
            assert q.prepare_kernel(force=True)
    assert fused_decode.enable(model, force=True)
    _force_eos_at(model, -1)
    return model


def test_dry_run_notes_prefill_and_frame_kernels_and_changes_no_prefill(q4_model):
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=8)
    prompt = random_prompt(TINY, 8).to(DEVICE)[None]
    q4_model.setup_caches(1, 64)
    want = q4_model.prefill(prompt)
    noted = record_launches(q4_model, (5, 40), params)
    names = {kernel.__name__ for kernel, *_ in noted}
    # prefill: the small-M GEMM; the frame: the GEMV, the decode attention, the norms (and on a GPU the sampling)
    assert {"int_gemm_kernel", "_decode_attn_kernel", "_rms_norm_kernel"} <= names and names & GEMVS
    assert ("_topk_sample_kernel" in names) == (DEVICE == "cuda")
    gemm_m = {args[kernel.arg_names.index("M")] for kernel, grid, args, kwargs in noted
              if kernel.__name__ == "int_gemm_kernel"}
    assert gemm_m == {5, 40}  # one prefill per prompt length
    got = q4_model.prefill(prompt)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # a dry run that needs longer caches leaves the model its own (the attention span follows their size)
    caches = [b.attention.kv_cache for b in q4_model.layers]
    assert record_launches(q4_model, (100,), params)
    assert q4_model.max_seq == 64 and [b.attention.kv_cache for b in q4_model.layers] == caches


@pytest.mark.slow  # 5-11 minutes under the interpreter; seconds on a GPU
def test_compiling_ahead_changes_no_generated_frame(q4_model):
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=8)
    prompt = random_prompt(TINY, 8).to(DEVICE)
    want = generate_frames(q4_model, prompt, 3, params, seed=1, use_graphs=False)
    record_launches(q4_model, (5, 40), params)
    assert compile_kernels(q4_model) == (len(distinct_launches(record_launches(q4_model))) if DEVICE == "cuda" else 0)
    got = generate_frames(q4_model, prompt, 3, params, seed=1, use_graphs=False)
    assert torch.equal(got, want)


def test_distinct_launches_keep_one_launch_per_specialization(q4_model):
    kernel, t = object(), torch.zeros(64, dtype=torch.bfloat16)
    launches = [(kernel, (1,), (t, 32, 0.5), {"BITS": 4}),
                (kernel, (9,), (torch.ones(8, dtype=torch.bfloat16), 48, 1.5), {"BITS": 4}),  # same as the first
                (kernel, (1,), (t, 33, 0.5), {"BITS": 4}),  # 33: not a multiple of 16
                (kernel, (1,), (t, 1, 0.5), {"BITS": 4}),  # 1 is specialized too
                (kernel, (1,), (t[1:], 32, 0.5), {"BITS": 4}),  # a pointer off 16-byte alignment
                (kernel, (1,), (t.float(), 32, 0.5), {"BITS": 4}),  # another dtype
                (kernel, (1,), (t, 32, 0.5), {"BITS": 2}),  # another compile-time constant
                (object(), (1,), (t, 32, 0.5), {"BITS": 4})]  # another kernel
    kept = distinct_launches(launches)
    assert [next(i for i, y in enumerate(launches) if y is x) for x in kept] == [0, 2, 3, 4, 5, 6, 7]
    noted = record_launches(q4_model, (5,))
    kept = distinct_launches(noted)
    assert len(kept) < len(noted) and {k for k, *_ in kept} == {k for k, *_ in noted}
