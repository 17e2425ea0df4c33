"""Launchers for the Triton kernels: argument checks, launch configs (heuristic or tuned), torch custom ops.

Each launch is host-side arithmetic plus one kernel (two when a GEMM's split-K needs its reduction; the integer
GEMV reduces its split-K in the same launch, with a persistent per-device counter buffer): no host sync, outputs
from torch's caching allocator, so the ops can be captured in CUDA graphs and traced by torch.compile
(`s2conv::int_linear`, `s2conv::float_linear`, each with a fake implementation).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

from s2conv.errors import RuntimeModelError
from s2conv.quant_formats.base import two_level_scales
from s2conv.runtime.kernels import cuda_frag, cuda_int, cuda_rows, fused
from s2conv.runtime.kernels.launch import counters, launch, pdl_args
from s2conv.runtime.kernels.layout import (BLOCK_K, ROWS, WORDS, IntSpec, dequantize_packed_fragment,
                                          fragment_chunk, fragment_chunk_words, fragment_unit, padded_rows,
                                          uses_fragment_layout)
from s2conv.runtime.kernels.triton_float import float_gemm_kernel, float_gemv_kernel, splitk_reduce_kernel
from s2conv.runtime.kernels.triton_int import int_gemm_kernel, int_gemv_kernel
from s2conv.runtime.kernels.triton_mma import mma_linear_kernel

log = logging.getLogger(__name__)

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_GROUPS = (16, 32, 64, 128, 256, 512)
GEMV_MAX_M = 1  # M above this takes the tensor-core GEMM kernels
# triton's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16): multiply in fp32 there
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_in_fp32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or (_INTERPRETED and x.dtype == torch.bfloat16)


@dataclass(frozen=True)
class Config:
    """One launch configuration. split: programs along K (1 = no second kernel); block_k: float kernels only."""

    block_n: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2
    block_m: int = 16
    block_k: int = 128
    int_dot: bool = False  # integer GEMV with bf16/fp16 x: the dp2a path (`int_dot_xmax`)
    slices: int = 1  # its row slices (1 or 4)
    fold_norm: bool = False  # the dp2a path takes a preceding RMSNorm into its launch (`fuses_norm`)
    pipeline: int = 0  # float GEMV (M = 1): stages of its loop's asynchronous-copy pipeline (0 or 1: a plain loop)


# (kernel kind, bits (16 = bf16, 8 = fp8 for float kinds), group, has_min, gated, N, K, M bucket, x dtype) ->
# Config chosen by `tune` on this process's GPU. Filled only by `tune`; lookups never benchmark implicitly, so a
# first call inside CUDA-graph capture is as safe as any other.
TUNED: dict[tuple, Config] = {}


def _m_bucket(m: int) -> int:
    return 1 if m <= GEMV_MAX_M else 16 if m <= 16 else 32 if m <= 32 else 64


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100; on CPU (the triton interpreter) the config only has to be valid


def _split_for(n_programs: int, n_chunks: int, device: torch.device, waves: float = 2.0) -> tuple[int, int]:
    """(split, chunks per split) so that about `waves` x SM-count programs run; every split gets >= 1 chunk."""
    want = max(1, round(waves * _sm_count(device) / max(n_programs, 1)))
    per = -(-n_chunks // min(want, n_chunks))
    return -(-n_chunks // per), per


def default_config(kind: str, bits: int, n: int, k: int, m: int, device: torch.device, gated: bool = False,
                   group: int = 0) -> Config:
    """The untuned launch config. M = 1: the integer GEMV takes one 16-row group per program (block_n is not
    used) and split-K 4 only when N is too small to fill the GPU (N = 2560); the float GEMV no split, 8 rows and
    512 columns a step (16 and 256 for fp8 w1|w3 and bf16 wqkv) through a 3-4-stage copy pipeline (the best of
    `scripts/probe_gemv.py`'s sweep at S2's shapes on an H100)."""
    if m <= GEMV_MAX_M:
        if kind == "int":
            small = -(-n // 16) < 2 * _sm_count(device)
            # the dp2a path (fp32 x takes the float path whatever the config); S2CONV_INT_DOT=0 keeps every format
            # on the float path (benchmark baseline)
            int_dot = os.environ.get("S2CONV_INT_DOT", "1") != "0"
            # the float-x path splits 3-bit w1|w3 as well; the dp2a path runs it whole (H100, q3 frames 265.6 ->
            # 276.6 frames/s: bench/RESULTS.md, fourteenth session)
            split = 4 if small or (gated and bits == 3 and not int_dot) else 1
            # 4 row slices only for 4-bit codes with one scale per 128 (slower with per-32 windows);
            # folding the RMSNorm in measured no faster on an H100 (the saved norm launches cost as much again in
            # the GEMV's extra loads: bench/RESULTS.md, fifth session): opt-in, S2CONV_FOLD_NORM=1
            return Config(block_n=16, split=split, num_warps=4, num_stages=1, int_dot=int_dot,
                          slices=4 if bits == 4 and group >= 128 else 1,
                          fold_norm=os.environ.get("S2CONV_FOLD_NORM", "0") == "1")
        # an asynchronous-copy pipeline in the loop (fp8 frames +5%, bf16 +0.5% on an H100), which also makes
        # split-K unnecessary at N = 2560: 8 rows and 512 columns a step there (bench/RESULTS.md, eighth session)
        if group == 16:  # int8 codes with a scale per 16 (q6_k): the plain loop (H200 probe, per layer 50.7 ->
            # 46.0 us: `scripts/probe_rowmajor8.py`), split 4 at N = 2560
            return Config(block_n=8, split=4 if n < 6144 else 1, num_warps=4, num_stages=3, block_k=512,
                          pipeline=1)
        if n < 6144:
            return Config(block_n=8, split=1, num_warps=4, num_stages=3, block_k=512, pipeline=4)
        if gated == (bits == 8):  # fp8 w1|w3 and bf16 wqkv: 16 rows x 256
            return Config(block_n=16, split=1, num_warps=4, num_stages=3, block_k=256, pipeline=3)
        return Config(block_n=8, split=1, num_warps=4, num_stages=3, block_k=512, pipeline=3)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if kind == "int":
        # about 3 waves of 64-row tiles: one wave left the SMs latency-bound (q4 at M = 32 on an H100: 131 ->
        # 100 us per layer with the swapped tiles; bench/RESULTS.md, sixth session)
        split, _ = _split_for(-(-n // 64) * -(-m // block_m), -(-k // BLOCK_K), device, waves=3.0)
        return Config(block_n=64, split=split, num_warps=4, num_stages=2, block_m=block_m)
    split, _ = _split_for(-(-n // 64) * -(-m // block_m), -(-k // 128), device, waves=1.0)
    return Config(block_n=64, split=split, num_warps=4, num_stages=3, block_m=block_m, block_k=128)


def scale_windows(bits: int, group: int) -> tuple[int, int]:
    """(windows per word, fields per window) of the integer GEMV: the fields of a word (one per 16-code slot)
    that share one scale group of every column (as `_int_rows_gemv` computes them)."""
    fields = 16 if bits == 3 else 32 // bits
    slots = group // WORDS  # slots per scale group
    n = fields // slots if slots < fields else 1
    return n, fields // n


def int_dot_xmax(bits: int, offset: int, group: int) -> int:
    """The integer range [-XMAX, XMAX] the dp2a GEMV scales x to, 0 where it cannot run exactly.

    Each window's integer sum (min(group / 16, fields per word) codes of one word) is converted through a float
    with integers exact below 2**22. XMAX is the largest 2**b - 1 (b <= 15, the int16 halves of dp2a) under that
    bound, at least 2**12 - 1: x keeps >= 12 bits against its largest element, an error far below bf16 rounding
    of the output.
    0 also where the dp2a kernel has no form for the scale windows: it pairs fields (two per dp2a) inside a window
    and keeps up to 4 windows' scales in registers (16-code groups: one field per window).
    """
    windows, per_window = scale_windows(bits, group)
    if per_window < 2 or windows > 4:
        return 0
    fields = 16 if bits == 3 else 32 // bits
    dev = max(offset, (1 << bits) - 1 - offset)  # largest |code|
    bound = (2**22 - 1) // (min(group // 16, fields) * dev)
    b = min(15, (bound + 1).bit_length() - 1)
    return 2**b - 1 if b >= 12 else 0


def _fail(op: str, what: str, expected: str, got) -> RuntimeModelError:
    return RuntimeModelError(f"{op}: {what} must be {expected}, got {got}")


def _check_x(op: str, x: torch.Tensor, device: torch.device) -> None:
    if x.dim() != 2:
        raise _fail(op, "x", "2-D [M, K]", tuple(x.shape))
    if x.dtype not in _X_DTYPES:
        raise _fail(op, "x dtype", "bfloat16, float16 or float32", x.dtype)
    if x.stride(1) != 1:
        raise _fail(op, "x", "contiguous along K (stride 1)", x.stride())
    if x.device != device:
        raise _fail(op, "x device", f"the weight's device {device}", x.device)
    if x.shape[0] == 0:
        raise _fail(op, "M (rows of x)", ">= 1", 0)


def _check_tensor(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, device) -> None:
    if t.dtype != dtype:
        raise _fail(op, f"{name} dtype", str(dtype), t.dtype)
    if tuple(t.shape) != shape:
        raise _fail(op, f"{name} shape", str(shape), tuple(t.shape))
    if not t.is_contiguous():
        raise _fail(op, name, "contiguous", t.stride())
    if t.device != device:
        raise _fail(op, f"{name} device", str(device), t.device)


def _outputs(x: torch.Tensor, n: int, split: int, gated: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, partial buffer or None). Split-K programs write fp32 partials [split, M, N (2N gated)]."""
    m = x.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if split == 1:
        return y, None
    return y, torch.empty(split, m, 2 * n if gated else n, device=x.device, dtype=torch.float32)


def _reduce(part: torch.Tensor, y: torch.Tensor, gated: bool, residual: Optional[torch.Tensor]) -> None:
    split, m, _ = part.shape
    n = y.shape[1]
    grid = (triton.cdiv(n, 1024), m)
    r = residual if residual is not None else y
    launch(splitk_reduce_kernel, grid, part, y, r, n, split, part.stride(0), part.stride(1), y.stride(0), r.stride(0),
           GATED=gated, BLOCK=1024, num_warps=4, HAS_RES=residual is not None, outputs=(y,), **pdl_args(y.device))


def _check_residual(op: str, residual: Optional[torch.Tensor], x: torch.Tensor, n: int, gated: bool) -> None:
    if residual is None:
        return
    if gated:
        raise _fail(op, "residual", "None for a gated (w1|w3) linear", tuple(residual.shape))
    if tuple(residual.shape) != (x.shape[0], n) or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise _fail(op, "residual", f"[{x.shape[0]}, {n}] {x.dtype}, contiguous along N",
                    f"{tuple(residual.shape)} {residual.dtype} {residual.stride()}")
    if residual.device != x.device:
        raise _fail(op, "residual device", str(x.device), residual.device)


def split_max(split: int) -> int:
    """SPLIT_MAX of a GEMV launch with `split` K ranges (`common.finish_split`): the finishing program loads all
    the partials at once; S2CONV_SPLIT_UNROLL=0 keeps the loop (benchmark baseline)."""
    if split <= 1 or os.environ.get("S2CONV_SPLIT_UNROLL", "1") == "0":
        return 0
    return triton.next_power_of_2(split)


def per_group_dots(group: int, has_min: bool) -> bool:
    """PER_GROUP of the float GEMM for int8 codes with a scale per `group` (`triton_float._float_rows_gemm`): one dot
    per group of 32+ codes without mins, else dequantized tiles in two dots (S2CONV_GROUP_DOT=0: always those)."""
    return group >= 32 and not has_min and os.environ.get("S2CONV_GROUP_DOT", "1") != "0"


def scaled_codes(group: int, has_min: bool) -> bool:
    """SCALED of the float GEMV for int8 codes with a scale per `group` (`triton_float._float_rows_gemv`): each code
    scaled into the running products where the groups carry mins (q5_k per layer on an H200 48.2 -> 46.3 us), the
    products summed per group where they do not (q8_0 42.2 against 43.1 scaled, q6_k 46.0 against 51.8, q3_k 43.3
    against 47.0 while it was row-major); S2CONV_GROUP_SUM=scaled or =grouped forces one form."""
    forced = os.environ.get("S2CONV_GROUP_SUM")
    return bool(group) and (forced == "scaled" if forced in ("scaled", "grouped") else has_min)


def idp_unroll(per: int, split: int, gated: bool) -> int:
    """UNROLL of a dp2a GEMV launch whose programs take up to `per` blocks of K in `split` ranges
    (`_int_rows_gemv_idp`): straight-line blocks where a program is one split-K share (up to 8 blocks; gated, with
    two weights' tiles in flight, up to 2), else 1 (the loop). Per layer on an H200 (`scripts/probe_gemv.py`
    shapes, us, loop / unrolled at the default splits): q4 wo 6.4 / 6.2, w2 9.4 / 9.1, but wqkv (no split) 6.6 /
    7.3 and w1|w3 (no split, 5 blocks twice) 14.2 / 15.9; q8_0 wo 8.3 / 7.5, w2 13.4 / 12.7; q3's w1|w3 at split 4
    16.6 / 15.4, at split 1 (its default now) 14.5 / 14.1 (bench/RESULTS.md, fourteenth session).
    S2CONV_IDP_UNROLL=0: always the loop."""
    if os.environ.get("S2CONV_IDP_UNROLL", "1") == "0" or per <= 1 or split <= 1:
        return 1
    return per if per <= (2 if gated else 8) else 1


# ---- integer formats ---------------------------------------------------------------------------------------------
def _int_key(x, scales, bits, group, has_min, gated):
    rows = scales.shape[0]
    return ("int", bits, group, has_min, gated, rows // 2 if gated else rows, x.shape[1], _m_bucket(x.shape[0]),
            x.dtype)


def _fragment(bits: int, offset: int, group: int, has_min: bool) -> bool:
    """Whether this integer format's weight is in the fragment layout (layout.uses_fragment_layout)."""
    return uses_fragment_layout(IntSpec(bits, 0, 0, offset, group, has_min))


def fuses_norm(x: torch.Tensor, bits: int, offset: int, group: int, has_min: bool, k: int,
               config: Optional[Config] = None, gated: bool = False) -> bool:
    """Whether `int_linear_impl(.., norm_weight=..)` folds the RMSNorm into its kernel for this x (one row on the
    CUDA GEMV, or on the dp2a path with config.fold_norm; no mins) rather than running the RMSNorm kernel first."""
    if x.dim() != 2 or x.shape[0] > GEMV_MAX_M or x.dtype == torch.float32 or has_min:
        return False
    if _fragment(bits, offset, group, has_min):  # the tensor-core kernel takes no norm: a norm launch first
        return False
    if _cuda_gemv(x, bits, offset, group, has_min, k, config, gated):  # the CUDA GEMV folds it at no cost
        return True
    cfg = config or default_config("int", bits, 1, k, 1, x.device, group=group)
    return cfg.int_dot and cfg.fold_norm and int_dot_xmax(bits, offset, group) > 0


def _cuda_gemv(x: torch.Tensor, bits: int, offset: int, group: int, has_min: bool, k: int, config: Optional[Config],
               gated: bool) -> bool:
    """Whether a one-row integer linear runs the CUDA GEMV (`cuda_int.takes`: q4, q3, q2 and tq2_0 on a GPU with
    NVRTC, K up to `cuda_int.max_k`) rather than the Triton one: only with the default config, the dp2a path on
    (S2CONV_INT_DOT) and x's integer range exact for the format (`int_dot_xmax`)."""
    return (config is None and os.environ.get("S2CONV_INT_DOT", "1") != "0"
            and cuda_int.takes(x, bits, group, has_min, k, gated) and int_dot_xmax(bits, offset, group) > 0)


def norm_chain_args(op: str, x: torch.Tensor, gated: bool, ss_out: Optional[torch.Tensor],
                    zero: Optional[torch.Tensor], norm_ss: Optional[tuple] = None, gx_out: Optional[tuple] = None,
                    rs_in: Optional[tuple] = None) -> dict:
    """The GEMV launch arguments that chain RMSNorms through one-row GEMVs (no norm launch between them):

    ss_out: fp32 [1], the output's sum of squares is added to it (the next norm's statistic; not with gated);
    zero: fp32 [1], set to 0 by the launch (the slot its own input norm was read from, free again);
    norm_ss (float kernels): (ss fp32 [1], g [K], eps): x is rms_norm(x, g, eps) with the sum of squares of x read
    from ss instead of computed;
    gx_out: (g [N], buf [1, N] in x's dtype): the output times g, rounded, is also stored to buf (checked against N
    by `_check_gx`; not with gated);
    rs_in (integer kernels): (ss fp32 [1], eps): x arrives already multiplied by its RMSNorm's weight (a
    producer's gx_out) and the output is scaled by rsqrt(ss / K + eps): rms_norm(x) W^T up to where the two
    roundings fall. All of them need one row (M = 1)."""
    chain = {}
    if ss_out is None and zero is None and norm_ss is None and gx_out is None and rs_in is None:
        return chain
    if x.shape[0] != 1:
        raise _fail(op, "rows of x with a norm chain", "1", x.shape[0])
    for name, t in (("ss_out", ss_out), ("zero", zero), ("norm_ss", None if norm_ss is None else norm_ss[0]),
                    ("rs_in", None if rs_in is None else rs_in[0])):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != x.device):
            raise _fail(op, name, f"a 1-element float32 tensor on {x.device}", f"{t.dtype} {tuple(t.shape)}")
    if ss_out is not None:
        if gated:
            raise _fail(op, "ss_out", "None for a gated linear", "a tensor")
        chain.update(ss_out=ss_out, SS=True)
    if zero is not None:
        chain.update(zero_ptr=zero, ZERO=True)
    if norm_ss is not None:
        ss, g, eps = norm_ss
        if tuple(g.shape) != (x.shape[1],) or g.device != x.device or not g.is_contiguous():
            raise _fail(op, "norm weight", f"a contiguous [{x.shape[1]}] tensor on {x.device}", tuple(g.shape))
        chain.update(ss_in=ss, g_ptr=g, eps=float(eps), NORM=True, FIX=_INTERPRETED and x.dtype == torch.bfloat16)
    if rs_in is not None:
        chain.update(rs_ptr=rs_in[0], rs_k=x.shape[1], rs_eps=float(rs_in[1]), RS=True)
    if gx_out is not None:
        if gated:
            raise _fail(op, "gx_out", "None for a gated linear", "a tensor")
        chain.update(gx_g=gx_out[0], gx_ptr=gx_out[1], GX=True)
    return chain


def _check_gx(op: str, chain: dict, x: torch.Tensor, n: int) -> None:
    """gx_out (`norm_chain_args`): a contiguous weight [n] and buffer [1, n] in x's dtype, on x's device."""
    if chain.get("GX"):
        g, buf = chain["gx_g"], chain["gx_ptr"]
        if (tuple(g.shape) != (n,) or tuple(buf.shape) != (1, n) or buf.dtype != x.dtype
                or {g.device, buf.device} != {x.device} or not (g.is_contiguous() and buf.is_contiguous())):
            raise _fail(op, "gx_out", f"a contiguous weight [{n}] and a contiguous [1, {n}] {x.dtype} buffer on "
                        f"{x.device}", f"{tuple(g.shape)} and {buf.dtype} {tuple(buf.shape)} on {buf.device}")


def int_linear_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
                    bits: int, offset: int, group: int, gated: bool, config: Optional[Config] = None,
                    residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                    norm_eps: float = 0.0, ss_out: Optional[torch.Tensor] = None,
                    zero: Optional[torch.Tensor] = None, gx_out: Optional[tuple] = None,
                    rs_in: Optional[tuple] = None) -> torch.Tensor:
    """y [M, N] (x's dtype) = x [M, K] @ W^T for W in the integer layout of layout.py (16 interleaved rows), or in
    its fragment layout where `layout.uses_fragment_layout` says so (then `fragment_linear_impl`, qweight
    [(2 if gated else 1) * cdiv(N, 16), chunks * layout.fragment_chunk_words(bits)]).

    scales fp32 [R, n_blocks * 512 // group] (groups of 32 codes or more); qweight int32
    [padded_rows(R), n_blocks * 16 * bits]; mins: only for the fragment layout's formats. R = N, or 2N with
    gated=True (w1 over w3, as `cat_rows` stacks them: qweight [2 padded_rows(N), ..]; y = silu(x w1^T) *
    (x w3^T)).
    K = x.shape[1] must lie in the last block: n_blocks * 512 - 512 < K <= n_blocks * 512.
    residual [M, N] (x's dtype, not with gated): returns residual + x W^T, the add done in the kernel's epilogue.
    norm_weight [K] (with norm_eps): x is first put through fish-speech's RMSNorm with that weight, folded into
    the kernel where `fuses_norm` says so (one launch, x read once), else by `fused.rms_norm` first.
    ss_out, zero, gx_out, rs_in: `norm_chain_args` (one row; ss_out and gx_out not with gated).
    """
    op = "s2conv::int_linear"
    dev = qweight.device
    _check_x(op, x, dev)
    chain = norm_chain_args(op, x, gated, ss_out, zero, gx_out=gx_out, rs_in=rs_in)
    if norm_weight is not None and rs_in is not None:
        raise _fail(op, "norm_weight with rs_in", "one of them (rs_in: x already carries the norm's weight)", "both")
    if bits not in (2, 3, 4):
        raise _fail(op, "bits", "2, 3 or 4", bits)
    if group not in _GROUPS:
        raise _fail(op, "group", f"one of {_GROUPS}", group)
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (x.shape[1],) or norm_weight.device != dev or not norm_weight.is_contiguous():
            raise _fail(op, "norm_weight", f"a contiguous [{x.shape[1]}] tensor on {dev}",
                        f"{tuple(norm_weight.shape)} on {norm_weight.device}")
        if not fuses_norm(x, bits, offset, group, mins is not None, x.shape[1], config, gated):
            x = fused.rms_norm(x, norm_weight, norm_eps)
            norm_weight = None
    if _fragment(bits, offset, group, mins is not None):
        return fragment_linear_impl(x, qweight, scales, bits, offset, group, gated, config, residual, chain, mins)
    if mins is not None or group < 32:  # what the interleaved layout's kernels read (layout.uses_fragment_layout)
        raise _fail(op, "an interleaved-layout weight", "no mins and scale groups of 32 codes or more",
                    f"group {group}{' with mins' if mins is not None else ''}")
    if qweight.dim() != 2 or qweight.shape[1] % (WORDS * bits):
        raise _fail(op, "qweight shape", f"[R, a multiple of {WORDS * bits}] for {bits}-bit", tuple(qweight.shape))
    rows, words = qweight.shape
    n_blocks = words // (WORDS * bits)
    m, k = x.shape
    if not (n_blocks - 1) * BLOCK_K < k <= n_blocks * BLOCK_K:
        raise _fail(op, "K (columns of x)", f"in ({(n_blocks - 1) * BLOCK_K}, {n_blocks * BLOCK_K}] for this qweight", k)
    rows = scales.shape[0] if scales.dim() else 0
    if gated and rows % 2:
        raise _fail(op, "rows of gated scales", "even (w1 over w3)", rows)
    n = rows // 2 if gated else rows
    n_pad = padded_rows(n)
    _check_tensor(op, "qweight", qweight, torch.int32, ((2 if gated else 1) * n_pad, words), dev)
    half = scales.dtype == torch.float16  # `layout.repack_int` keeps a file's fp16 scales (q4_0)
    _check_tensor(op, "scales", scales, torch.float16 if half else torch.float32, (rows, n_blocks * BLOCK_K // group),
                  dev)
    _check_residual(op, residual, x, n, gated)
    _check_gx(op, chain, x, n)
    if gated and m > GEMV_MAX_M and n_pad == n and config is None:
        # the GEMM reads w1|w3 as one weight of 2N rows (the stacked layouts are one layout when N fills whole row
        # groups) and a second small launch takes silu(a) * b: the gated GEMM, its loop inlined twice, compiled
        # 2.5x as long as the plain one (q2_k's, when q2_k ran here: 30 s against 13 on the 2-core CPU machine, the
        # longest kernel of a cold start), and the plain one is the same kernel as the model's other linears
        both = int_linear_impl(x, qweight, scales, None, bits, offset, group, False)
        return fused.silu_mul(both[:, :n], both[:, n:])
    if (_cuda_gemv(x, bits, offset, group, False, k, config, gated)
            and cuda_int.aligned(x, qweight, scales, group, norm_weight)):
        try:
            return cuda_int.int_gemv(x, qweight, scales, gated, residual, norm_weight, norm_eps, ss_out, zero,
                                     gx_out, rs_in, offset, bits, group)
        except RuntimeModelError as e:  # no NVRTC here: this device keeps the Triton kernel (cuda_common.available)
            log.warning("%s", e)
    cfg = config or TUNED.get(_int_key(x, scales, bits, group, False, gated)) or default_config(
        "int", bits, n, k, m, dev, gated, group)
    per = -(-n_blocks // cfg.split)
    split = -(-n_blocks // per)
    y, part = _outputs(x, n, split, gated)
    out = y if part is None else part
    stride_os = 0 if part is None else part.stride(0)
    stride_sn = scales.stride(0)
    r_arg = residual if residual is not None else y
    common = dict(BITS=bits, OFF=offset, GROUP=group, EVEN_K=k == n_blocks * BLOCK_K,
                  GATED=gated, PARTIAL=part is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **pdl_args(dev))
    stride_wg = ROWS * words  # int32 words per row group
    w3_off = n_pad * words  # where w3's row groups start (gated)
    if m <= GEMV_MAX_M:  # one row group per program; split-K finished inside the launch (int_gemv_kernel's PARTIAL)
        n_tiles = triton.cdiv(n, ROWS)
        cnt = counters(dev, n_tiles * m) if part is not None else y
        p_arg = part if part is not None else y
        # fp32 x keeps the float path: its outputs equal the reference to fp32 rounding, the dp2a path's to x's
        # 16-bit integer rounding (far below a bf16/fp16 output's)
        xmax = int_dot_xmax(bits, offset, group) if cfg.int_dot and x.dtype != torch.float32 else 0
        if norm_weight is not None and not xmax:  # only the dp2a path folds it (`fuses_norm` promised the CUDA
            x = fused.rms_norm(x, norm_weight, norm_eps)  # GEMV, which could not take this call after all)
            norm_weight = None
        if xmax:
            common.update(num_warps=cfg.num_warps if cfg.slices == 4 else max(cfg.num_warps, 4))
        # the last-arriving program of a split finishes the row tile, residual included
        launch(
            int_gemv_kernel, (n_tiles, split, m),
            x, qweight, scales, y, p_arg, cnt, r_arg, n, k, n_blocks, per, split, 0x4B000000,
            x.stride(0), stride_wg, w3_off, stride_sn, y.stride(0), p_arg.stride(0), p_arg.stride(-2),
            r_arg.stride(0), BPP=per, HAS_RES=residual is not None, XMAX=xmax,
            UNROLL=idp_unroll(per, split, gated) if xmax else 1,
            SLICES=cfg.slices, ASM=not _INTERPRETED, g_ptr=x if norm_weight is None else norm_weight,
            eps=float(norm_eps), NORM=norm_weight is not None, SPLIT_MAX=split_max(split), outputs=(y,), **chain,
            **common)
        return y
    assert not chain, "norm_chain_args allows one row only"
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    launch(int_gemm_kernel, grid, x, qweight, scales, out, r_arg, m, n, k, n_blocks, per,
           x.stride(0), stride_wg, w3_off, n_pad, stride_sn, out.stride(-2), stride_os, r_arg.stride(0),
           IEEE=_dot_in_fp32(x), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           HAS_RES=residual is not None and part is None, outputs=(out,), **common)
    if part is not None:
        _reduce(part, y, gated, residual)
    return y


def _fragment_split(tiles: int, units: int, m: int) -> int:
    """Split-K of the tensor-core kernel: about 2,560 one-warp programs (near the best of `scripts/probe_mma.py`'s
    sweep at S2's shapes on an H100: 8 for wqkv, 16 for wo and w2; the gated w1|w3 gets 4 from the 608 tiles of
    each half, a plain 2N-row weight 2), at most 16 and the units."""
    want = 2560 / (tiles * -(-m // 8))
    split = 1
    while split * 2 <= min(16, units) and split * 2 <= want * 1.5:
        split *= 2
    return split


def fragment_linear_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, offset: int,
                         group: int, gated: bool, config: Optional[Config] = None,
                         residual: Optional[torch.Tensor] = None, chain: Optional[dict] = None,
                         mins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`int_linear_impl` for weights in the fragment layout (layout.py): the tensor-core kernel of triton_mma.py
    for bf16/fp16 x at any M (8 rows a program), split-K finished in the launch. qweight int32 [(2 if gated) *
    cdiv(N, 16), chunks * fragment_chunk_words(bits)], scales (and mins, formats with mins) fp32 [R, chunks *
    chunk // group]. fp32 x takes the reference path (the whole weight dequantized at every call, then x @ W^T:
    exact to fp32 rounding, slow). An odd K runs on x padded with a zero column. chain: `norm_chain_args` (one
    row)."""
    op = "s2conv::int_linear"
    dev = qweight.device
    chain = chain or {}
    chunk, cw = fragment_chunk(bits), fragment_chunk_words(bits)
    rows = scales.shape[0] if scales.dim() == 2 else 0
    if gated and rows % 2:
        raise _fail(op, "rows of gated scales", "even (w1 over w3)", rows)
    n = rows // 2 if gated else rows
    tiles = -(-n // 16)
    if qweight.dim() != 2 or qweight.shape[1] % cw or qweight.shape[1] == 0:
        raise _fail(op, "qweight shape", f"[tiles, a positive multiple of {cw}] (fragment layout)",
                    tuple(qweight.shape))
    chunks = qweight.shape[1] // cw
    kp = chunks * chunk
    unit = fragment_unit(bits, group)
    m, k = x.shape
    if kp % unit or not kp - unit < k <= kp:
        raise _fail(op, "K (columns of x)", f"in ({kp - unit}, {kp}] for this qweight", k)
    _check_tensor(op, "qweight", qweight, torch.int32, ((2 if gated else 1) * tiles, chunks * cw), dev)
    kq = 0  # groups per super-block of two-level scales (`layout.repack_int`)
    if scales.dtype == torch.int16:
        n_sup = mins.shape[1] if mins is not None and mins.dim() == 3 else 0
        kq = (kp // group) // n_sup if n_sup and (kp // group) % n_sup == 0 else 0
        if not kq or (kq * group) % chunk:
            raise _fail(op, "two-level scales", "int16 [R, groups] with mins (d, dmin) [R, groups / kq, 2], super-"
                        "blocks of whole chunks", f"{tuple(scales.shape)} with "
                        f"{None if mins is None else tuple(mins.shape)}")
        _check_tensor(op, "sub-block scales", scales, torch.int16, (rows, kp // group), dev)
        _check_tensor(op, "super-block scales", mins, torch.float32, (rows, n_sup, 2), dev)
    else:
        _check_tensor(op, "scales", scales, torch.float32, (rows, kp // group), dev)
        if mins is not None:
            _check_tensor(op, "mins", mins, torch.float32, (rows, kp // group), dev)
    _check_residual(op, residual, x, n, gated)
    _check_gx(op, chain, x, n)
    if x.dtype == torch.float32:  # reference path: exact to fp32 rounding
        if kq:
            scales, mins = two_level_scales(scales, mins)
        mm = mins if mins is not None else scales
        halves = ([(qweight[:tiles], scales[:n], mm[:n]), (qweight[tiles:], scales[n:], mm[n:])] if gated
                  else [(qweight, scales, mm)])
        w = torch.cat([dequantize_packed_fragment(bits, offset, group, q, s, k, mins=None if mins is None else mn)
                       for q, s, mn in halves])
        y = x @ w.T
        if "rs_ptr" in chain:
            y = y * torch.rsqrt(chain["rs_ptr"] / chain["rs_k"] + chain["rs_eps"])
        if gated:
            y = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        if residual is not None:
            y = y + residual
        if "gx_ptr" in chain:
            chain["gx_ptr"].copy_(y * chain["gx_g"].float())
        if "ss_out" in chain:
            chain["ss_out"] += (y * y).sum()
        if "zero_ptr" in chain:
            chain["zero_ptr"].zero_()
        return y
    if (m == 1 and config is None and offset == 0 and cuda_frag.takes(x, bits, group, kq, k, gated)
            and cuda_frag.aligned(x, qweight, scales, mins)):  # q4_k's, q2_k's one row: the CUDA GEMV
        try:
            return cuda_frag.frag_gemv(
                x, qweight, scales, mins, gated, residual, chain.get("ss_out"), chain.get("zero_ptr"),
                (chain["gx_g"], chain["gx_ptr"]) if "gx_ptr" in chain else None,
                (chain["rs_ptr"], chain["rs_eps"]) if "rs_ptr" in chain else None, bits=bits, group=group)
        except RuntimeModelError as e:  # no NVRTC here: this device keeps the tensor-core kernel
            log.warning("%s", e)
    if k % 2 or x.data_ptr() % 4 or x.stride(0) % 2:  # x is read as int32 words (pairs): even rows, aligned
        x = torch.nn.functional.pad(x, (0, k % 2))  # a fresh tensor; the zero column meets padding codes
        k = x.shape[1]
    units = kp // unit
    config = config or TUNED.get(_int_key(x, scales, bits, group, mins is not None, gated))
    split = config.split if config is not None else _fragment_split(tiles, units, m)
    per_unit = -(-units // min(max(split, 1), units))
    split = -(-units // per_unit)
    warps = config.num_warps if config is not None else 1
    y, part = _outputs(x, n, split, gated)
    programs = triton.cdiv(tiles, warps)
    grid = (triton.cdiv(m, 8), programs, split)  # batch tiles first: one weight tile's readers share L2
    cnt = counters(dev, programs * grid[0]) if part is not None else y
    p_arg = part if part is not None else y
    r_arg = residual if residual is not None else y
    launch(mma_linear_kernel, grid, x, qweight, scales, mins if mins is not None else scales, y, p_arg, cnt, r_arg,
           m, n, k, chunks, per_unit * (unit // chunk), split, x.stride(0) // 2, qweight.stride(0), tiles,
           scales.stride(0), y.stride(0), p_arg.stride(0), p_arg.stride(-2), r_arg.stride(0), BITS=bits, OFF=offset,
           GROUP=group, HAS_MIN=mins is not None, NW=warps, EVEN_K=k == kp, GATED=gated, PARTIAL=part is not None,
           HAS_RES=residual is not None, F16=x.dtype == torch.float16, ASM=not _INTERPRETED, num_warps=warps,
           SPLIT_MAX=split_max(split), PRE=mins is not None, KQ=kq, outputs=(y,), **chain, **pdl_args(dev))
    return y


# ---- row-major weights (fp8 e4m3 or int8 + per-row scale, bf16; int8 + a scale per group) -------------------------
def _float_key(x, weight, has_scale, gated, group=0):
    rows = weight.shape[0]
    bits = 8 if weight.dtype in (torch.float8_e4m3fn, torch.int8) else 16
    return ("float", bits, group, has_scale, gated, rows // 2 if gated else rows, x.shape[1],
            _m_bucket(x.shape[0]), x.dtype)


def float_linear_impl(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor], gated: bool,
                      config: Optional[Config] = None, residual: Optional[torch.Tensor] = None,
                      ss_out: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                      norm_ss: Optional[tuple] = None, gx_out: Optional[tuple] = None, group: int = 0,
                      mins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = (x [M, K] @ weight^T) * scales for weight float8_e4m3fn, int8 or bfloat16 [R, K], scales fp32 [R]
    or None; R = N, or 2N with gated=True; residual as in `int_linear_impl`; ss_out, zero, norm_ss, gx_out:
    `norm_chain_args`. group > 0 (int8 weight, K a multiple of it): scales fp32 [R, K / group], one per group of
    codes along K, and optionally mins alike: w = scale * code - min."""
    op = "s2conv::float_linear"
    dev = weight.device
    _check_x(op, x, dev)
    chain = norm_chain_args(op, x, gated, ss_out, zero, norm_ss, gx_out)
    if weight.dtype not in (torch.float8_e4m3fn, torch.int8, torch.bfloat16):
        raise _fail(op, "weight dtype", "float8_e4m3fn, int8 or bfloat16", weight.dtype)
    if weight.dim() != 2:
        raise _fail(op, "weight", "2-D [R, K]", tuple(weight.shape))
    rows, k = weight.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise _fail(op, "K (columns of x)", f"{k} (the weight's columns)", x.shape[1])
    if gated and rows % 2:
        raise _fail(op, "rows of a gated weight", "even (w1 over w3)", rows)
    _check_tensor(op, "weight", weight, weight.dtype, (rows, k), dev)
    if group:
        if weight.dtype != torch.int8 or scales is None or k % group or group not in _GROUPS:
            raise _fail(op, "grouped weight", f"int8 codes, scales and K a multiple of group in {_GROUPS}",
                        f"{weight.dtype}, K {k}, group {group}")
        _check_tensor(op, "scales", scales, torch.float32, (rows, k // group), dev)
        if mins is not None:
            _check_tensor(op, "mins", mins, torch.float32, (rows, k // group), dev)
    elif scales is not None:
        _check_tensor(op, "scales", scales, torch.float32, (rows,), dev)
    if mins is not None and not group:
        raise _fail(op, "mins", "only with group > 0", "mins")
    n = rows // 2 if gated else rows
    _check_residual(op, residual, x, n, gated)
    _check_gx(op, chain, x, n)
    if (m == 1 and config is None and scales is not None and cuda_rows.takes(x, weight, True, group, k, gated)
            and cuda_rows.aligned(x, weight, scales, norm_ss)):
        try:
            return cuda_rows.rows8_gemv(x, weight, scales, gated, residual, ss_out, zero, norm_ss, gx_out)
        except RuntimeModelError as e:  # no NVRTC here: this device keeps the Triton kernel (cuda_common.available)
            log.warning("%s", e)
    cfg = config or TUNED.get(_float_key(x, weight, scales is not None, gated, group)) or default_config(
        "float", 8 if weight.dtype in (torch.float8_e4m3fn, torch.int8) else 16, n, k, m, dev, gated, group)
    # no K step wider than K (small models, tests), nor narrower than a scale group
    bk = max(group, min(cfg.block_k, max(16, triton.next_power_of_2(k))))
    chunks = triton.cdiv(k, bk)
    per = triton.cdiv(chunks, cfg.split)
    split = triton.cdiv(chunks, per)
    y, part = _outputs(x, n, split, gated)
    out = y if part is None else part
    stride_os = 0 if part is None else part.stride(0)
    s_arg = scales if scales is not None else weight
    r_arg = residual if residual is not None else y
    grouped = dict(stride_sn=s_arg.stride(0) if group else 0, GROUP=group, m_ptr=mins if mins is not None else s_arg,
                   HAS_MIN=mins is not None)
    common = dict(HAS_SCALE=scales is not None, EVEN_K=k % bk == 0, GATED=gated, PARTIAL=part is not None,
                  HAS_RES=residual is not None and part is None,
                  BLOCK_N=cfg.block_n, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **pdl_args(dev))
    if m <= GEMV_MAX_M:  # split-K finished inside the launch, as in the integer GEMV
        n_tiles = triton.cdiv(n, cfg.block_n)
        cnt = counters(dev, n_tiles * m) if part is not None else y
        p_arg = part if part is not None else y
        common.update(HAS_RES=residual is not None, PIPE=max(cfg.pipeline, 1), ASM=not _INTERPRETED)
        launch(float_gemv_kernel, (n_tiles, split, m), x, weight, s_arg, y, p_arg, cnt, r_arg, n, k, per * bk,
               split, x.stride(0), weight.stride(0), y.stride(0), p_arg.stride(0), p_arg.stride(-2), r_arg.stride(0),
               SPLIT_MAX=split_max(split), SCALED=scaled_codes(group, mins is not None),
               outputs=(y,), **grouped, **chain, **common)
        return y
    else:
        assert not chain, "norm_chain_args allows one row only"
        grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
        launch(float_gemm_kernel, grid, x, weight, s_arg, out, r_arg, m, n, k, per * bk, x.stride(0),
               weight.stride(0), out.stride(-2), stride_os, r_arg.stride(0), IEEE=_dot_in_fp32(x),
               BLOCK_M=cfg.block_m, PER_GROUP=per_group_dots(group, mins is not None), outputs=(out,), **grouped,
               **common)
    if part is not None:
        _reduce(part, y, gated, residual)
    return y


# ---- torch custom ops ----------------------------------------------------------------------------------------------
@torch.library.custom_op("s2conv::int_linear", mutates_args=())
def int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
               bits: int, offset: int, group: int, gated: bool, residual: Optional[torch.Tensor] = None,
               norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0) -> torch.Tensor:
    """Custom-op form of `int_linear_impl` (tuned or default config)."""
    return int_linear_impl(x, qweight, scales, mins, bits, offset, group, gated, residual=residual,
                           norm_weight=norm_weight, norm_eps=norm_eps)


@int_linear.register_fake
def _(x, qweight, scales, mins, bits, offset, group, gated, residual=None, norm_weight=None, norm_eps=0.0):
    return x.new_empty(x.shape[0], scales.shape[0] // (2 if gated else 1))


@torch.library.custom_op("s2conv::float_linear", mutates_args=())
def float_linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor], gated: bool,
                 residual: Optional[torch.Tensor] = None, group: int = 0,
                 mins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Custom-op form of `float_linear_impl`."""
    return float_linear_impl(x, weight, scales, gated, residual=residual, group=group, mins=mins)


@float_linear.register_fake
def _(x, weight, scales, gated, residual=None, group=0, mins=None):
    return x.new_empty(x.shape[0], weight.shape[0] // (2 if gated else 1))


# ---- tuning ---------------------------------------------------------------------------------------------------------
def candidate_configs(kind: str, m: int) -> list[Config]:
    """The small search space `tune` times. Kept small because every block size is a separate compilation (the
    integer kernels unroll 32 slots per block); splits are clamped to the number of K chunks at launch."""
    if m <= GEMV_MAX_M:
        if kind == "int":  # one 16-row group per program: the path, the split and the warps vary
            return ([Config(16, sp, w, 1) for w in (2, 4, 8) for sp in (1, 2, 4, 8)]
                    + [Config(16, sp, 4, 1, int_dot=True, slices=sl) for sl in (1, 4) for sp in (1, 2, 4, 8)])
        return [Config(bn, sp, 4, 3, block_k=bk, pipeline=3) for bn in (8, 16, 32) for sp in (1, 2, 4, 8)
                for bk in (128, 256)]
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    if kind == "int":
        return [Config(bn, sp, 4, 2, block_m=bm) for bn in (32, 64) for sp in (1, 2, 4)]
    return [Config(bn, sp, 4, 3, block_m=bm, block_k=128) for bn in (32, 64, 128) for sp in (1, 2, 4)]


def graph_time_ms(fn: Callable[[], object], calls: int = 16, reps: int = 5) -> float:
    """GPU time per call of fn: `calls` calls captured in one CUDA graph, replayed `reps` times. Unlike eager
    timing this excludes Python launch overhead (tens of us here, more than a whole GEMV), as a decode graph does;
    give fn rotating weights so that L2 does not hold them."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * calls)


def tune(fn: Callable[[Config], torch.Tensor], key: tuple, kind: str, m: int,
         calls: int = 16) -> tuple[Config, float]:
    """Time `fn(config)` for each candidate with `graph_time_ms`, store the fastest in TUNED[key]; -> (config, ms).

    Not graph-capture safe itself: call it at load time, before capturing the decode graph.
    """
    best: tuple[Config, float] | None = None
    for cfg in candidate_configs(kind, m):
        try:
            ms = graph_time_ms(lambda: fn(cfg), calls=calls)
        except (triton.runtime.errors.OutOfResources, RuntimeError) as e:  # a config too big for this GPU
            log.debug("config %s skipped: %s", cfg, e)
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        raise RuntimeModelError(f"tune: no launch config ran for {key}")
    TUNED[key] = best[0]
    return best
