"""The GPU kernels compile for Hopper (sm_90), on the CPU: triton's interpreter runs the kernels' Python and so
misses what only the compiler checks (types it cannot cast, such as a masked load's integer `other` for an fp8
tile, which once broke every fp8 prefill on GPUs while the interpreter tests passed). Each case compiles one
specialization the runtime launches, through the whole pipeline to a cubin, in one subprocess without
TRITON_INTERPRET (the interpreter replaces the kernels by Python functions the compiler cannot take)."""
import inspect
import json
import os
import subprocess
import sys

import pytest

_I32 = "i32"


def _float_runtime(weight: str, names: tuple) -> dict:
    ptrs = {"x_ptr": "*bf16", "w_ptr": weight, "s_ptr": "*fp32", "out_ptr": "*bf16", "r_ptr": "*bf16",
            "part_ptr": "*fp32", "cnt_ptr": "*i32", "m_ptr": "*fp32"}
    return {name: ptrs.get(name, _I32) for name in names}


_GEMM_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "r_ptr", "M", "N", "K", "k_per_split", "stride_xm", "stride_wn",
              "stride_om", "stride_os", "stride_rm", "stride_sn", "m_ptr")
_GEMV_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "part_ptr", "cnt_ptr", "r_ptr", "N", "K", "k_per_split", "n_split",
              "stride_xm", "stride_wn", "stride_om", "stride_ps", "stride_pm", "stride_rm", "stride_sn", "m_ptr")
_MMA_ARGS = ("M", "N", "K", "n_chunks", "chunks_per_split", "n_split", "stride_xw", "stride_wt", "w3_tiles",
             "stride_sn", "stride_om", "stride_ps", "stride_pm", "stride_rm")


def _cases() -> dict:
    """case id -> (kernel name, runtime argument types, compile-time values, warps)."""
    cases = {}
    # weight pointer type, GROUP, HAS_MIN: fp8, q8, bf16 (a scale per row or none), int8 codes with group scales
    for weight, group, has_min in [("*fp8e4nv", 0, False), ("*i8", 0, False), ("*bf16", 0, False),
                                   ("*i8", 32, False), ("*i8", 16, True)]:
        for even_k in (True, False):
            tag = f"{weight[1:]}-g{group}{'-mins' if has_min else ''}-{'even' if even_k else 'masked'}"
            cases["gemm-" + tag] = ("float_gemm_kernel", _float_runtime(weight, _GEMM_ARGS), dict(
                HAS_SCALE=weight != "*bf16", EVEN_K=even_k, GATED=False, PARTIAL=False, IEEE=False, BLOCK_M=32,
                BLOCK_N=64, BLOCK_K=128, PDL=False, HAS_RES=False, GROUP=group, HAS_MIN=has_min,
                PER_GROUP=group >= 32 and not has_min), 4)
            cases["gemv-" + tag] = ("float_gemv_kernel", _float_runtime(weight, _GEMV_ARGS), dict(
                HAS_SCALE=weight != "*bf16", EVEN_K=even_k, GATED=True, PARTIAL=True, BLOCK_N=8, BLOCK_K=512,
                PDL=False, HAS_RES=False, PIPE=1 if group == 16 else 3, ASM=True, GROUP=group, HAS_MIN=has_min,
                SCALED=has_min), 4)
    # q2 (no mins), q4_k (scales and mins a chunk ahead), q2_k and q3_k (two-level scales; q3_k's high bits)
    for bits, group, has_min, kq in [(2, 64, False, 0), (4, 32, True, 0), (2, 16, True, 16), (3, 16, True, 16)]:
        runtime = dict(x_ptr="*bf16", out_ptr="*bf16", r_ptr="*bf16", w_ptr="*i32", s_ptr="*i16" if kq else "*fp32",
                       m_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32", **{name: _I32 for name in _MMA_ARGS})
        cases[f"mma-{bits}bit-g{group}{'-kq' if kq else ''}"] = ("mma_linear_kernel", runtime, dict(
            BITS=bits, OFF=0 if has_min else 1 << (bits - 1), GROUP=group, HAS_MIN=has_min, NW=1, EVEN_K=True,
            GATED=True, PARTIAL=True, HAS_RES=False, PDL=False, PRE=has_min, KQ=kq), 1)
    # the interleaved layout's GEMV (dp2a path, 1 and 4 row slices; the float-x path of fp32 x) and GEMM
    from s2conv.runtime.kernels.ops import int_dot_xmax

    int_runtime = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*fp32", out_ptr="*bf16", part_ptr="*fp32",
                       cnt_ptr="*i32", r_ptr="*bf16", g_ptr="*bf16", eps="fp32",
                       **{name: _I32 for name in _INT_GEMV_ARGS})
    for bits, off, group in [(4, 8, 128), (3, 4, 128), (2, 2, 256)]:
        for xmax, slices in [(int_dot_xmax(bits, off, group), 1), (int_dot_xmax(bits, off, group), 4), (0, 1)]:
            runtime = dict(int_runtime, x_ptr="*bf16" if xmax else "*fp32")
            cases[f"int-gemv-{bits}bit-g{group}-{'dp2a' if xmax else 'float-x'}-{slices}"] = (
                "int_gemv_kernel", runtime, dict(BITS=bits, OFF=off, GROUP=group, EVEN_K=False, GATED=True,
                                                 PARTIAL=True, PDL=False, BPP=1 if xmax else 2, HAS_RES=False,
                                                 XMAX=xmax, SLICES=slices, ASM=True), 4)
        runtime = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*fp32", out_ptr="*bf16", r_ptr="*bf16",
                       **{name: _I32 for name in _INT_GEMM_ARGS})
        cases[f"int-gemm-{bits}bit-g{group}"] = ("int_gemm_kernel", runtime, dict(
            BITS=bits, OFF=off, GROUP=group, EVEN_K=False, GATED=True, PARTIAL=False, IEEE=False, BLOCK_M=32,
            BLOCK_N=64, PDL=False, HAS_RES=False), 4)
    # decode attention (fused qk-norm / RoPE / cache write, splits merged in the launch): per query head, per KV head
    attn_runtime = dict(q_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16", pos_ptr="*i64", off_ptr="*i64", o_ptr="*bf16",
                        part_ptr="*fp32", ml_ptr="*fp32", qw_ptr="*bf16", kw_ptr="*bf16", f_ptr="*fp32",
                        scale="fp32", eps="fp32", cnt_ptr="*i32", **{name: _I32 for name in _ATTN_ARGS})
    attn_const = dict(HAS_OFFSETS=False, FUSED=True, HAS_NORM=True, D=128, SINGLE=False, FIX=False,
                      PDL=3, SPLITS=8)  # PDL 3: what Hopper launches (`launch.early_pdl`)
    cases["attention-per-head"] = ("_decode_attn_kernel", dict(attn_runtime, N_REP=_I32), dict(attn_const,
                                                                                                 BLOCK_N=64), 2)
    cases["attention-per-kv-head"] = ("_decode_attn_gqa_kernel", attn_runtime, dict(
        attn_const, BLOCK_N=64, N_REP=4, QP=16, NR=4), 4)
    # QK-norm + RoPE + cache write: batched decode rows, and a prompt's rows (prefill)
    rope_runtime = dict(qkv_ptr="*bf16", qw_ptr="*bf16", kw_ptr="*bf16", f_ptr="*fp32", kc_ptr="*bf16",
                        vc_ptr="*bf16", q_ptr="*bf16", pos_ptr="*i64", eps="fp32",
                        **{name: _I32 for name in ("H", "HKV", "stride_qkv", "stride_f", "stride_cb", "stride_ch")})
    for prompt in (False, True):
        cases[f"qk-rope-cache-{'prompt' if prompt else 'decode'}"] = ("_qk_rope_cache_kernel", rope_runtime, dict(
            HAS_NORM=True, D=128, HEADS=8, FIX=False, PDL=False, PROMPT=prompt), 4)
    # the prefill's one-pass dequantize: each layout (row-major fp8 / int8 with mins, interleaved 3-bit, fragment
    # with two-level scales)
    for tag, q, layout, bits, off, group, has_min, kq in [("fp8", "*fp8e4nv", 0, 8, 0, 0, False, 0),
                                                          ("int8-mins", "*i8", 0, 8, 0, 32, True, 0),
                                                          ("interleaved-3bit", "*i32", 1, 3, 4, 128, False, 0),
                                                          ("fragment-kq", "*i32", 2, 2, 0, 16, True, 16),
                                                          ("fragment-3bit", "*i32", 2, 3, 0, 16, True, 16)]:
        runtime = dict(q_ptr=q, s_ptr="*i16" if kq else "*fp32", m_ptr="*fp32", out_ptr="*bf16", N=_I32, K=_I32,
                       stride_q=_I32, stride_s=_I32, n_sup=_I32)
        cases[f"dequant-{tag}"] = ("_dequant_kernel", runtime, dict(
            LAYOUT=layout, BITS=bits, OFF=off, GROUP=group, HAS_MIN=has_min, KQ=kq, BLOCK_N=16, BLOCK_K=256,
            FIX=False), 4)
    # the RMSNorm and the fused sampler, as Hopper launches them (PDL 3: `launch.launch_early`)
    cases["rms-norm-residual"] = ("_rms_norm_kernel", dict(
        x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", h_ptr="*bf16", y_ptr="*bf16", eps="fp32",
        **{name: _I32 for name in ("N", "stride_x", "stride_r")}), dict(
        HAS_RES=True, BLOCK=4096, FIX_X=False, FIX_Y=False, PDL=3), 8)
    for embed in (False, True):  # a fast-AR depth's draw also copies its code's embedding row (`sample_embed`)
        cases[f"topk-sample-select{'-embed' if embed else ''}"] = ("_topk_sample_kernel", dict(
            l_ptr="*bf16", v_ptr="*fp32", i_ptr="*i64", e_ptr="*fp32", out_ptr="*i64", sv_ptr="*fp32",
            si_ptr="*i32", d_ptr="*fp32", t_ptr="*bf16", x_ptr="*bf16",
            **{name: _I32 for name in ("V", "K", "stride_l", "stride_v", "stride_i", "stride_eb", "stride_ep",
                                       "stride_o", "D", "stride_t")},
            **{name: "fp32" for name in ("t0", "p0", "t1", "p1", "t2", "p2", "t3", "p3")}), dict(
            BLOCK_K=32, BLOCK_V=8192, SELECT=True, FIX=False, GROUPS=128, CAP=128, FROM_PTR=True, EMBED=embed,
            BLOCK_D=1024, PDL=3), 8)
    # a decode frame's small steps (kernels/frame.py): a column's embedding, RAS's main token, the loop's counters
    cases["frame-embed-column"] = ("_embed_column_kernel", dict(
        tok_ptr="*i64", e_ptr="*bf16", c_ptr="*bf16", out_ptr="*bf16", inv_scale="fp32",
        **{name: _I32 for name in ("stride_tb", "stride_tc", "D", "begin", "end", "cb_size")}), dict(
        N_CB=10, SCALE=True, BLOCK_D=1024, FIX=False, PDL=2), 4)
    cases["frame-ras-main"] = ("_ras_main_kernel", dict(
        n_ptr="*i64", h_ptr="*i64", prev_ptr="*i64", out_ptr="*i64",
        **{name: _I32 for name in ("W", "stride_p", "n_sem", "eos", "begin", "end")}), dict(BLOCK_W=16, PDL=2), 4)
    cases["frame-finish"] = ("_frame_finish_kernel", dict(
        f_ptr="*i64", frames_ptr="*i64", idx_ptr="*i64", col_ptr="*i64", prev_ptr="*i64", pos_ptr="*i64",
        **{name: _I32 for name in ("C", "W", "stride_frames")}), dict(BLOCK_C=16, BLOCK_W=16, RAS=True, PDL=2), 4)
    return cases


_ATTN_ARGS = ("H", "HKV", "n_keys", "keys_per_split", "n_splits", "stride_cb", "stride_ch", "stride_qkv", "stride_f")
_INT_GEMV_ARGS = ("N", "K", "n_blocks", "blocks_per_split", "n_split", "magic", "stride_xm", "stride_wg", "w3_off",
                  "stride_sn", "stride_om", "stride_ps", "stride_pm", "stride_rm")
_INT_GEMM_ARGS = ("M", "N", "K", "n_blocks", "blocks_per_split", "stride_xm", "stride_wg", "w3_off", "n_pad",
                  "stride_sn", "stride_om", "stride_os", "stride_rm")
CASES = _cases()


def compile_all() -> dict:
    """Compile every case for sm_90 (triton's CUDA backend, no GPU needed): case id -> None or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from s2conv.runtime.kernels import dequant, frame, fused, sampling, triton_float, triton_int, triton_mma

    results = {}
    for case, (name, runtime, constexprs, warps) in CASES.items():
        modules = (triton_float, triton_int, triton_mma, fused, dequant, frame, sampling)
        kernel = next(getattr(m, name) for m in modules if hasattr(m, name))
        params = inspect.signature(kernel.fn).parameters
        const = {p: v.default for p, v in params.items() if p not in runtime and p not in constexprs}
        const.update(constexprs)
        try:
            missing = [p for p, v in const.items() if v is inspect.Parameter.empty]
            assert not missing, f"no type or value for {missing}"
            src = ASTSource(fn=kernel, signature=dict(runtime, **{p: "constexpr" for p in const}), constexprs=const)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
            results[case] = None
        except Exception as e:  # noqa: BLE001  (reported per case)
            while e.__cause__ is not None:
                e = e.__cause__
            results[case] = f"{type(e).__name__}: {str(e)[-500:]}"
    return results


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_sm90(compiled, case):
    assert compiled[case] is None, compiled[case]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
