"""Triton kernels for the small steps of a decode frame around its transformer stacks: the slow AR's input
embedding of one frame column, RAS's choice of the main token, and the frame loop's bookkeeping after each frame.

Eagerly each is a dozen or so tiny kernels (comparisons, gathers, a sum, `where`s, copies), and in a frame's CUDA
graph every one of them is a dependent launch of its own on the frame's critical path. Here each is one launch. The
arithmetic follows the eager CUDA code to the bit:

    x = embed_column(tokens, E, C, ...)              # = DualARTransformer.embed(tokens) for tokens [B, 11, 1]
    main = ras_main(normal, high, previous, ...)     # = semantic_index_to_token + ras_select (sample_main)
    frame_finish(frame, frames, index, column, previous, pos)   # = FrameLoop's copies and counters
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.common import pdl_start, round_to
from s2conv.runtime.kernels.fused import _fix
from s2conv.runtime.kernels.launch import launch, pdl_args

_BLOCK_D = 1024  # embedding columns per program


@triton.jit
def _embed_column_kernel(tok_ptr, e_ptr, c_ptr, out_ptr, stride_tb, stride_tc, D, begin, end, cb_size, inv_scale,
                         N_CB: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, FIX: tl.constexpr,
                         PDL: tl.constexpr):
    """Program (row b, column tile): x = E[id] + (id semantic ? sum_i C[code_i + cb_size i] : 0), rounded to the
    table's dtype after the fp32 sum and after the add; semantic ids (begin <= id <= end) with SCALE also times
    inv_scale, rounded (eager CUDA divides a bf16 tensor by a Python float as a multiply by the fp32 reciprocal)."""
    pdl_start(PDL)
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = offs < D
    row = tok_ptr + b * stride_tb
    token = tl.load(row)
    semantic = (token >= begin) & (token <= end)
    dtype = out_ptr.dtype.element_ty
    vq = tl.zeros([BLOCK_D], tl.float32)
    # eager: the codebook rows' sum in fp32, rounded once (its reduction may add them in another order; the sums
    # agree whenever the ten values fit fp32's 24 bits together, as embedding rows of similar magnitude do)
    for i in tl.static_range(N_CB):
        code = tl.load(row + (i + 1) * stride_tc)
        vq += tl.load(c_ptr + (code + i * cb_size) * D + offs, mask=live, other=0.0).to(tl.float32)
    vq = tl.where(semantic, round_to(vq, dtype, FIX).to(tl.float32), 0.0)
    x = round_to(tl.load(e_ptr + token * D + offs, mask=live, other=0.0).to(tl.float32) + vq, dtype, FIX)
    if SCALE:
        x = tl.where(semantic, round_to(x.to(tl.float32) * inv_scale, dtype, FIX), x)
    tl.store(out_ptr + b * D + offs, x, mask=live)


def embed_column(tokens: torch.Tensor, embeddings: torch.Tensor, codebook_embeddings: torch.Tensor, begin: int,
                 end: int, codebook_size: int, scale: bool) -> torch.Tensor:
    """One frame column's input embeddings: tokens [B, 1 + N, 1] (main token, N codes) -> [B, 1, dim] in the
    tables' dtype, as `DualARTransformer.embed` computes them (spec 3.2): semantic ids begin..end get their
    codebook rows added (codebook i's rows start at i * codebook_size) and, with scale, divided by sqrt(N + 1)."""
    if tokens.dim() != 3 or tokens.shape[2] != 1 or tokens.dtype != torch.long:
        raise RuntimeModelError(f"embed_column: tokens must be int64 [B, 1 + N, 1], got {tokens.dtype} "
                                f"{tuple(tokens.shape)}")
    b, width, _ = tokens.shape
    d = embeddings.shape[1]
    if codebook_embeddings.shape != (codebook_size * (width - 1), d) or codebook_embeddings.dtype != embeddings.dtype \
            or not (embeddings.is_contiguous() and codebook_embeddings.is_contiguous()):
        raise RuntimeModelError(f"embed_column: codebook table must be contiguous [{codebook_size * (width - 1)}, "
                                f"{d}] {embeddings.dtype}, got {tuple(codebook_embeddings.shape)}")
    out = torch.empty(b, 1, d, dtype=embeddings.dtype, device=embeddings.device)
    # what eager CUDA multiplies by for `x / math.sqrt(N + 1)`: 1 / float32(sqrt(N + 1)) in float32
    inv = float(np.float32(1.0) / np.float32(math.sqrt(width)))
    launch(_embed_column_kernel, (b, triton.cdiv(d, _BLOCK_D)), tokens, embeddings, codebook_embeddings, out,
           tokens.stride(0), tokens.stride(1), d, begin, end, codebook_size, inv, N_CB=width - 1, SCALE=scale,
           BLOCK_D=_BLOCK_D, FIX=_fix(embeddings.dtype), outputs=(out,), **pdl_args(embeddings.device))
    return out


@triton.jit
def _ras_main_kernel(n_ptr, h_ptr, prev_ptr, out_ptr, W, stride_p, n_sem, eos, begin, end, BLOCK_W: tl.constexpr,
                     PDL: tl.constexpr):
    """Program b: the main token ids of row b's normal and high draws (column n_sem is <|im_end|>, the others
    semantic tokens from begin), then the high one where the normal one is a semantic token among the row's
    previous W main tokens."""
    pdl_start(PDL)
    b = tl.program_id(0)
    normal = tl.load(n_ptr + b)
    normal = tl.where(normal == n_sem, eos, normal + begin)
    high = tl.load(h_ptr + b)
    high = tl.where(high == n_sem, eos, high + begin)
    w = tl.arange(0, BLOCK_W)
    previous = tl.load(prev_ptr + b * stride_p + w, mask=w < W, other=0)
    seen = tl.sum(((previous == normal) & (w < W)).to(tl.int32), axis=0) > 0
    repeatable = (normal >= begin) & (normal <= end)
    tl.store(out_ptr + b, tl.where(seen & repeatable, high, normal))


def ras_main(normal: torch.Tensor, high: torch.Tensor, previous: torch.Tensor, n_semantic: int, eos: int,
             begin: int, end: int) -> torch.Tensor:
    """Main token ids [B] from the normal and high draws' column indices of `semantic_logits` (normal, high: [B]
    int64; the column n_semantic is <|im_end|>) and the previous W main tokens [B, W]: `semantic_index_to_token`
    of both, then `sampling.ras_select` with the normal token's repeatability (semantic ids begin..end)."""
    bsz = normal.shape[0]
    if normal.shape != (bsz,) or high.shape != (bsz,) or previous.dim() != 2 or previous.shape[0] != bsz \
            or previous.stride(1) != 1 or {normal.dtype, high.dtype, previous.dtype} != {torch.long}:
        raise RuntimeModelError(f"ras_main: normal, high must be int64 [B] and previous int64 [B, W] with "
                                f"contiguous rows, got {tuple(normal.shape)} {tuple(high.shape)} "
                                f"{tuple(previous.shape)}")
    out = torch.empty_like(normal)
    w = previous.shape[1]
    launch(_ras_main_kernel, (bsz,), normal, high, previous, out, w, previous.stride(0), n_semantic, eos, begin, end,
           BLOCK_W=max(16, triton.next_power_of_2(w)), outputs=(out,), **pdl_args(normal.device))
    return out


@triton.jit
def _frame_finish_kernel(f_ptr, frames_ptr, idx_ptr, col_ptr, prev_ptr, pos_ptr, C, W, stride_frames,
                         BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, RAS: tl.constexpr, PDL: tl.constexpr):
    """One program: frames[:, index] = frame, column = frame, previous = previous[1:] + [frame[0]] (RAS), then
    pos += 1 and index += 1."""
    pdl_start(PDL)
    c = tl.arange(0, BLOCK_C)
    live = c < C
    frame = tl.load(f_ptr + c, mask=live)
    index = tl.load(idx_ptr)
    pos = tl.load(pos_ptr)
    w = tl.arange(0, BLOCK_W)
    shifted = tl.load(prev_ptr + w + 1, mask=w + 1 < W, other=0)  # W = 0 without RAS
    tl.debug_barrier()  # every thread has read what the stores below overwrite
    tl.store(frames_ptr + c * stride_frames + index, frame, mask=live)
    tl.store(col_ptr + c, frame, mask=live)
    if RAS:
        main = tl.load(f_ptr)
        tl.store(prev_ptr + w, tl.where(w == W - 1, main, shifted), mask=w < W)
    tl.store(idx_ptr, index + 1)
    tl.store(pos_ptr, pos + 1)


def frame_finish(frame: torch.Tensor, frames: torch.Tensor, index: torch.Tensor, column: torch.Tensor,
                 previous: torch.Tensor | None, pos: torch.Tensor) -> None:
    """A batch-1 frame loop's step after its frame [1, C]: frames [C, max_frames] gets it at column index[0],
    column [1, C, 1] becomes it, previous [1, W] (RAS's window, or None) shifts it in, and pos, index [1] count
    up. In place, one launch (eagerly six kernels)."""
    c = frame.shape[-1]
    if frame.shape != (1, c) or frames.shape[0] != c or column.numel() != c or not frame.is_contiguous() \
            or not column.is_contiguous() or frames.stride(1) != 1:
        raise RuntimeModelError(f"frame_finish: frame [1, C], frames [C, n], column [1, C, 1] expected, got "
                                f"{tuple(frame.shape)} {tuple(frames.shape)} {tuple(column.shape)}")
    w = 0 if previous is None else previous.shape[1]
    launch(_frame_finish_kernel, (1,), frame, frames, index, column, frame if previous is None else previous, pos,
           c, w, frames.stride(0), BLOCK_C=triton.next_power_of_2(c), BLOCK_W=max(16, triton.next_power_of_2(w)),
           RAS=previous is not None and w > 0, outputs=(), **pdl_args(frame.device))
