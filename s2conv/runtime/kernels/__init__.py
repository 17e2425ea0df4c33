"""Fused dequantize-and-multiply Triton kernels for the runtime's linear layers (batch-1 GEMV, small-M GEMM).

    packed = REPACK["q4"](codes, scales)        # once, at model load: kernel layout (layout.py)
    y = KERNELS["q4"](x, packed)                # x [..., K] bf16/fp16/fp32 -> y [..., N], x's dtype
    h = KERNELS["q4"](x, packed, residual=h)    # h + x W^T, the add in the kernel's epilogue
    h = GATED_KERNELS["q4"](x, cat_rows(p1, p3))  # silu(x W1^T) * (x W3^T) in one weight pass
    y = KERNELS["q4"](h, packed, norm=(g, eps))  # rms_norm(h) W^T (integer formats; folded in where
                                                 # KERNELS["q4"].fuses_norm(h, packed), else a norm first)
    h = KERNELS["q4"](x, packed, residual=h, ss_out=ss)  # one row: + the output's sum of squares into ss, so that
    y = KERNELS["fp8"](h, p8, norm_ss=(ss, g, eps))      # a float kernel takes rms_norm(h) without a norm launch
    h = KERNELS["q4"](x, packed, residual=h, ss_out=ss, gx_out=(g, hg))  # ... and h * g into hg, so that
    y = KERNELS["q4"](hg, packed, rs_in=(ss, eps))       # an integer kernel takes it too (rsqrt on its output)

From `dequant.PREFILL_M` rows of 16-bit x on (prefill), a launcher dequantizes the weight once and multiplies with
cuBLAS instead. The model never calls the launchers directly; `QuantLinear` dispatches through KERNELS by format
name. Without triton (or without a GPU and TRITON_INTERPRET=1) KERNELS is empty and the layout helpers still work.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.layout import (  # noqa: F401  (public re-exports)
    BLOCK_K, FLOAT_FORMATS, INT_SPECS, REPACK, cat_rows, dequantize_packed, padded_k, repack_bf16, repack_fp8,
    repack_int, repack_q2, repack_q3, repack_q4, repack_q4_0, repack_q4_k, repack_q8, repack_q8_0, split_rows,
    uses_row_major_layout,
)

log = logging.getLogger(__name__)

KERNELS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {}
GATED_KERNELS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {}


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _eager() -> bool:
    """Outside torch.compile the launchers are called directly: the custom-op dispatcher adds tens of us of CPU
    time per call (harmless inside CUDA graphs, but it dominates eager GEMVs)."""
    return not torch.compiler.is_compiling()


def _dense(x: torch.Tensor, **chain) -> bool:
    """Whether a launch takes the prefill path (`_dense_linear`): many 16-bit rows, nothing chained, not inside
    torch.compile (which goes through the custom ops)."""
    return (x.shape[0] >= dequant.PREFILL_M and x.dtype in (torch.bfloat16, torch.float16)
            and all(v is None for v in chain.values()) and _eager())


def _dense_linear(fmt: str, x: torch.Tensor, packed: dict, gated: bool, residual: torch.Tensor | None):
    """x [M, K] @ W^T through the weight dequantized once (`dequant.dequantize`) and cuBLAS; gated: silu(x W1^T)
    * (x W3^T), as `FeedForward` computes it, each half of the joined weight on its own (`cat_rows` stacks each
    tensor whole, row padding included)."""
    def product(p: dict) -> torch.Tensor:
        return torch.nn.functional.linear(x, dequant.dequantize(fmt, p, x.shape[1], x.dtype))

    if gated:
        h1, h3 = (product(half) for half in split_rows(packed))
        y = torch.nn.functional.silu(h1) * h3
    else:
        y = product(packed)
    if residual is None:
        return y
    if residual.shape != y.shape or residual.dtype != y.dtype:
        raise RuntimeModelError(f"{fmt} linear: residual must be {list(y.shape)} {y.dtype}, got "
                                f"{list(residual.shape)} {residual.dtype}")
    return residual + y


def _int_kernel(fmt: str, gated: bool):
    spec = INT_SPECS[fmt]

    def linear(x: torch.Tensor, packed: dict, residual: torch.Tensor | None = None,
               norm: tuple[torch.Tensor, float] | None = None, ss_out: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, gx_out: tuple | None = None,
               rs_in: tuple | None = None) -> torch.Tensor:
        r = None if residual is None else _flat(residual)
        g, eps = norm if norm is not None else (None, 0.0)
        args = (_flat(x), packed["qweight"], packed["scales"], packed.get("mins"), spec.bits, spec.offset,
                spec.group, gated)
        if _dense(args[0], norm=norm, ss_out=ss_out, zero=zero, gx_out=gx_out, rs_in=rs_in):
            y = _dense_linear(fmt, args[0], packed, gated, r)
        elif _eager():
            y = ops.int_linear_impl(*args, residual=r, norm_weight=g, norm_eps=eps, ss_out=ss_out, zero=zero,
                                    gx_out=gx_out, rs_in=rs_in)
        else:
            assert ss_out is None and zero is None and gx_out is None and rs_in is None, \
                "norm chains run eagerly or in CUDA graphs, not compiled"
            y = torch.ops.s2conv.int_linear(*args, r, g, eps)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fuses_norm(x: torch.Tensor, packed: dict) -> bool:
        """Whether linear(x, packed, norm=...) folds the norm into its one kernel launch."""
        return ops.fuses_norm(_flat(x), spec.bits, spec.offset, spec.group, "mins" in packed, x.shape[-1],
                              gated=gated)

    linear.fuses_norm = fuses_norm
    linear.takes_norm_ss = False
    # rs_in: x arrives times its RMSNorm's weight (a producer's gx_out), the rsqrt applied here (q4 frames +7% on
    # an H200: bench/RESULTS.md)
    linear.takes_rs_in = True

    linear.__name__ = f"{fmt}_{'gated' if gated else 'linear'}"
    linear.__doc__ = f"{fmt}: x [..., K] @ W^T from REPACK[{fmt!r}] output" + (" (gated w1|w3)" if gated else "")
    return linear


def _float_kernel(fmt: str, gated: bool, group: int = 0):
    """The launcher of a row-major weight: a float format, or (group > 0) an integer format whose int8 codes stay
    row-major with a scale (and min) per group (`layout.uses_row_major_layout`)."""
    def linear(x: torch.Tensor, packed: dict, residual: torch.Tensor | None = None,
               ss_out: torch.Tensor | None = None, zero: torch.Tensor | None = None,
               norm_ss: tuple[torch.Tensor, torch.Tensor, float] | None = None,
               gx_out: tuple | None = None) -> torch.Tensor:
        r = None if residual is None else _flat(residual)
        args = (_flat(x), packed["weight"], packed.get("scales"), gated)
        grouped = dict(group=group, mins=packed.get("mins"))
        if _dense(args[0], ss_out=ss_out, zero=zero, norm_ss=norm_ss, gx_out=gx_out):
            y = _dense_linear(fmt, args[0], packed, gated, r)
        elif _eager():
            y = ops.float_linear_impl(*args, residual=r, ss_out=ss_out, zero=zero, norm_ss=norm_ss, gx_out=gx_out,
                                      **grouped)
        else:
            assert ss_out is None and zero is None and norm_ss is None and gx_out is None, \
                "norm chains run eagerly, not compiled"
            y = torch.ops.s2conv.float_linear(*args, r, **grouped)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    linear.takes_norm_ss = True  # norm_ss: the RMSNorm of x applied inside, its statistic from a producer
    linear.takes_rs_in = False

    linear.__name__ = f"{fmt}_{'gated' if gated else 'linear'}"
    linear.__doc__ = f"{fmt}: x [..., K] @ W^T from REPACK[{fmt!r}] output" + (" (gated w1|w3)" if gated else "")
    return linear


try:
    from s2conv.runtime.kernels import dequant, ops  # noqa: F401  (ops registers the torch custom ops)
except ImportError as e:  # triton missing: the runtime falls back to dequantize + F.linear
    log.info("s2conv kernels unavailable: %s", e)
else:
    for _fmt, _spec in INT_SPECS.items():
        if uses_row_major_layout(_spec):
            KERNELS[_fmt] = _float_kernel(_fmt, False, _spec.group)
            GATED_KERNELS[_fmt] = _float_kernel(_fmt, True, _spec.group)
        else:
            KERNELS[_fmt] = _int_kernel(_fmt, False)
            GATED_KERNELS[_fmt] = _int_kernel(_fmt, True)
    for _fmt in FLOAT_FORMATS:
        KERNELS[_fmt] = _float_kernel(_fmt, False)
        GATED_KERNELS[_fmt] = _float_kernel(_fmt, True)
