"""Swap the dual-AR model's batch-1 decode path (one position per step, CUDA) onto the fused Triton kernels.

    fused_decode.enable(model)    # after loading (and after QuantLinear.prepare_kernel)
    fused_decode.disable(model)   # back to the eager forwards

Per transformer block and decode step this leaves: norm, wqkv, attention with the qk-norm, RoPE and cache write of
the new position (one kernel, its key splits merged inside; batched rows: a separate qk-norm/RoPE/cache kernel
first), wo, add+norm, w1|w3 (one GEMV on a concatenated weight, or the fused gated kernel of a QuantLinear; silu*mul
inside), w2 with the residual add in its epilogue; a block's `fill_cache` (a position whose output nobody reads)
runs norm, wqkv and the qk-norm/RoPE/cache kernel only.

At one row the norms chain instead: wo and w2 add up the sum of squares of what they store in a slot of the block
that reads it (`_ss_mid`, the next block's `_ss_in`), and the launch after each reader resets the slot. Float GEMVs
(bf16, fp8, q8) apply the RMSNorm from it; for integer GEMVs wo and w2 also store their output times the norm's
weight (`_gx_mid`, the next block's `_gx_in`), which wqkv and w1|w3 read, scaling their outputs by the rsqrt
(`_norm_mode`; not for 8-bit codes with mins, nor fp16 activations; S2CONV_INT_NORM_CHAIN=0: norm launches). A
block is then 5 launches (each stack's first block keeps its attention-norm launch). With S2CONV_FOLD_NORM=1 and the
integer chain off, integer formats at one row fold both norms into the next GEMV (`_folds_norm`).

Every RMSNorm (not the QK-norms) runs the norm kernel at any number of rows, prefill included. Outside the blocks,
at one bf16 row, the fast AR's head and the semantic head (its rows joined once: semantic tokens, then
<|im_end|>) take the Triton GEMV instead of cuBLAS. A single prompt's prefill (`prefill_block`) runs the eager
block's arithmetic with its QK-norms, RoPE and cache writes in one launch; batched prompts (per-row masks) and CPU
tensors keep the eager code of `layers.py`. Around the stacks, a decode column's input embedding, RAS's choice of
the main token and the frame loop's bookkeeping run one kernel each (`kernels/frame.py`, `_install_frame_ops`)
instead of a dozen small eager kernels each. The Linear modules are still called as they are, so every weight
format keeps working. `batch.py` runs its decode steps of left-padded rows through `decode_block` too (per-row
RoPE rows and key offsets) once `enable` swapped the blocks.
"""
from __future__ import annotations

import logging
import os
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.runtime.layers import RMSNorm, TransformerBlock
from s2conv.runtime.qlinear import QuantLinear
from s2conv.runtime.sampling import sample_many

log = logging.getLogger(__name__)
# the norm chain through integer GEMVs (`_norm_mode` "gx"); 0: norm launches (benchmark baseline)
_INT_CHAIN = os.environ.get("S2CONV_INT_NORM_CHAIN", "1") != "0"
_HALF = (torch.bfloat16, torch.float16)


def _fused():
    """The kernel module, or None when triton is missing."""
    try:
        from s2conv.runtime.kernels import fused
    except ImportError as e:
        log.info("fused decode kernels unavailable: %s", e)
        return None
    return fused


def _active(module: nn.Module, x: Tensor) -> bool:
    return x.is_cuda or module._fused_force


# ---- swapped forwards (bound to each instance; the class forward is the fallback) ---------------------------------
def _norm_forward(self: RMSNorm, x: Tensor) -> Tensor:
    if not _active(self, x):
        return RMSNorm.forward(self, x)
    return self._fused.rms_norm(x, self.weight, self.eps)


def _head_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """A bias-free bf16 head (the fast AR's output) at one row: the Triton GEMV, else the class forward (cuBLAS)."""
    if x.dim() == 2 and x.shape[0] == 1 and _active(self, x) and _bf16_gemv(self.weight, x, True):
        return _linear(self, x, True)
    return nn.Linear.forward(self, x)


def _semantic_logits(self: nn.Module, hidden: Tensor) -> Tensor:
    """`semantic_logits` at one bf16 row from the joined head rows (semantic tokens, then <|im_end|>): one GEMV
    launch instead of two cuBLAS products and a cat; otherwise the class method."""
    emb = self.embeddings.weight
    if self.__dict__["_semantic_head_key"] != (emb.data_ptr(), emb._version):  # new weights, or moved: join again
        _join_semantic_head(self, self.__dict__["_semantic_head_force"])
    head = self.__dict__["_semantic_head"]
    on_kernels = hidden.is_cuda or self.__dict__["_semantic_head_force"]
    if hidden.dim() == 2 and hidden.shape[0] == 1 and on_kernels and _bf16_gemv(head, hidden, True):
        from s2conv.runtime.kernels import KERNELS

        return KERNELS["bf16"](hidden, {"weight": head})
    return type(self).semantic_logits(self, hidden)


def _embed(self: nn.Module, tokens: Tensor) -> Tensor:
    """`embed` of one frame column per row (a decode step's input, on CUDA) in one launch
    (`kernels.frame.embed_column`, which follows eager CUDA's rounding); otherwise the class method."""
    emb = self.embeddings.weight
    if not (tokens.is_cuda and tokens.dim() == 3 and tokens.shape[2] == 1 and emb.dtype in _HALF):
        return type(self).embed(self, tokens)
    cfg = self.cfg
    return self.__dict__["_frame_ops"].embed_column(
        tokens, emb, self.codebook_embeddings.weight, cfg.semantic_begin_id, cfg.semantic_end_id,
        cfg.codebook_size, cfg.scale_codebook_embeddings)


def _sample_main(self: nn.Module, logits: Tensor, params, generator, previous: Tensor | None,
                 noise: Tensor | None = None, values: Tensor | None = None) -> Tensor:
    """`sample_main` with RAS: both draws as before, then their token ids and RAS's choice in one launch
    (`kernels.frame.ras_main`) instead of about 13 small kernels; otherwise the class method."""
    on_kernels = logits.is_cuda or self.__dict__["_frame_ops_force"]
    if previous is None or params.greedy or params.ras_window == 0 or not on_kernels:
        return type(self).sample_main(self, logits, params, generator, previous, noise, values)
    normal, high = sample_many(logits, [params, params.high()], generator, noise=noise, values=values)
    cfg = self.cfg
    n_semantic = cfg.semantic_end_id - cfg.semantic_begin_id + 1  # the <|im_end|> column of `semantic_logits`
    return self.__dict__["_frame_ops"].ras_main(normal, high, previous.contiguous(), n_semantic, cfg.eos_token_id,
                                                cfg.semantic_begin_id, cfg.semantic_end_id)


def _block_forward(self: TransformerBlock, x: Tensor, freqs_cis: Tensor, mask: Tensor,
                   input_pos: Tensor | None = None) -> Tensor:
    if _prompt_fuses(self, x, freqs_cis, mask, input_pos):
        return prefill_block(self, x, freqs_cis, mask, input_pos)
    if x.shape[1] != 1 or input_pos is None or self.attention.kv_cache is None or not _active(self, x):
        return TransformerBlock.forward(self, x, freqs_cis, mask, input_pos)
    # mask [1, span]: its width is the attention span the eager path reads (keys > pos are masked inside)
    return decode_block(self, x, freqs_cis, input_pos, mask.shape[-1])


def _prompt_fuses(block: TransformerBlock, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos) -> bool:
    """Whether `prefill_block` takes this call: one prompt of several positions into a KV cache, one RoPE row and
    one mask row per position, the softmax of F.scaled_dot_product_attention (the slow AR's)."""
    attn = block.attention
    return (x.shape[0] == 1 and x.shape[1] > 1 and input_pos is not None and attn.kv_cache is not None
            and not attn.explicit_softmax and freqs_cis.dim() == 3 and mask.dim() == 2 and _active(block, x))


def prefill_block(block: TransformerBlock, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
    """A prompt x [1, S, dim] at cache positions input_pos [S] through a block swapped by `enable`: the eager
    block's arithmetic, with the QK-norms, RoPE and KV-cache writes of all S positions in one launch
    (`qk_norm_rope_cache_prompt`, ~30 eager kernels otherwise) and the RMSNorms on the norm kernel."""
    attn, cache = block.attention, block.attention.kv_cache
    b, s, _ = x.shape
    qw, kw, eps = _qk_norm_args(attn)
    qkv = attn.wqkv(block.attention_norm(x))
    q = block._fused.qk_norm_rope_cache_prompt(qkv[0], qw, kw, freqs_cis, cache.k_cache, cache.v_cache, input_pos,
                                               attn.n_head, attn.n_kv_head, eps)  # [S, H, D]
    kv_len, groups = mask.shape[-1], attn.n_head // attn.n_kv_head
    k = cache.k_cache[:b, :, :kv_len].repeat_interleave(groups, dim=1)
    v = cache.v_cache[:b, :, :kv_len].repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask)  # [1, H, S, D]
    h = x + attn.wo(y.transpose(1, 2).reshape(b, s, attn.n_head * attn.head_dim))
    return h + block.feed_forward(block.ffn_norm(h))


def decode_block(block: TransformerBlock, x: Tensor, freqs_cis: Tensor, pos: Tensor, span: int,
                 offsets: Tensor | None = None) -> Tensor:
    """One decode position of a block swapped by `enable`, through the fused kernels: x [B, 1, dim] -> [B, 1, dim].

    pos: 1-element device tensor, the cache index of every row; span: keys read (a Python int > pos);
    freqs_cis: RoPE table row [1, D/2, 2], or [B, 1, D/2, 2] per row; offsets (optional [B] device tensor, the pad
    offsets of left-padded rows): row b reads only keys offsets[b] <= j <= pos (see `batch.row_mask`)."""
    attn, cache, k = block.attention, block.attention.kv_cache, block._fused
    gemv = x.shape[0] * x.shape[1] == 1  # one row: float linears take the Triton GEMV
    mode_in = _chain_mode(block, x, gemv)  # the previous block's w2 left the sum of squares of x in _ss_in
    nxt = block.__dict__.get("_next_block")
    mode_next = _chain_mode(nxt, x, gemv) if nxt is not None else None
    ss_next = nxt._ss_in if mode_next else None  # w2 leaves them for the next block
    gx_next = (nxt.attention_norm.weight, nxt._gx_in) if mode_next == "gx" else None
    qkv = _qkv(block, x, gemv, mode_in)
    qw, kw, eps = _qk_norm_args(attn)
    if x.shape[0] == 1:  # qk-norm, RoPE and cache write inside the attention launch
        y = k.rope_attention(qkv, qw, kw, freqs_cis, cache.k_cache, cache.v_cache, pos, span, attn.n_head,
                             attn.n_kv_head, eps, offsets=offsets)
    else:  # batched rows: the two-kernel form measured 2-3% faster at batch 32 on an H100 (bench/RESULTS.md)
        q = k.qk_norm_rope_cache(qkv, qw, kw, freqs_cis, cache.k_cache, cache.v_cache, pos, attn.n_head,
                                 attn.n_kv_head, eps)
        y = k.decode_attention(q, cache.k_cache, cache.v_cache, pos, span, attn.n_head // attn.n_kv_head, offsets)
    zero_in = block._ss_in if mode_in else None  # wo runs after wqkv, the slot's reader: wo resets it
    ff, w13 = block.feed_forward, _w13(block.feed_forward)
    mode_mid = _ffn_norm_mode(block, ff, w13, x, gemv)
    if mode_mid == "ss":
        # the residual add in wo's epilogue, which also sums the squares of h; w1|w3 applies the ffn norm itself
        h = _linear(attn.wo, y, gemv, residual=x, ss_out=block._ss_mid, zero=zero_in)
        return _ffn(ff, h, k, gemv, residual=h, ss_out=ss_next, zero=block._ss_mid, gx_out=gx_next,
                    norm_ss=(block._ss_mid, block.ffn_norm.weight, block.ffn_norm.eps))
    if mode_mid == "gx":
        # wo also stores h times the ffn norm's weight; w1|w3 reads that and applies the rsqrt to its output
        h = _linear(attn.wo, y, gemv, residual=x, ss_out=block._ss_mid, zero=zero_in,
                    gx_out=(block.ffn_norm.weight, block._gx_mid))
        return _ffn(ff, block._gx_mid.view(x.shape), k, gemv, residual=h, ss_out=ss_next, zero=block._ss_mid,
                    gx_out=gx_next, rs_in=(block._ss_mid, block.ffn_norm.eps))
    if isinstance(w13, tuple) and _kernel_runs(ff.w1, x) and _launcher_folds(w13[0], x, w13[1]):
        # the residual add in wo's epilogue, the ffn norm inside the w1|w3 GEMV: no add+norm launch
        h = _linear(attn.wo, y, gemv, residual=x, zero=zero_in)
        return _linear(ff.w2, w13[0](h, w13[1], norm=_norm_args(block.ffn_norm)), gemv, residual=h, ss_out=ss_next,
                       gx_out=gx_next)
    h, n = k.add_rms_norm(x, _linear(attn.wo, y, gemv, zero=zero_in), block.ffn_norm.weight, block.ffn_norm.eps)
    return _ffn(ff, n, k, gemv, residual=h, ss_out=ss_next, gx_out=gx_next)


def _block_fill_cache(self: TransformerBlock, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> None:
    """`TransformerBlock.fill_cache` at one decode position through the kernels: norm, wqkv, then the qk-norm /
    RoPE / cache-write kernel (3 launches, 2 when the norm chains)."""
    if x.shape[1] != 1 or self.attention.kv_cache is None or not _active(self, x):
        return TransformerBlock.fill_cache(self, x, freqs_cis, input_pos)
    attn, cache = self.attention, self.attention.kv_cache
    qw, kw, eps = _qk_norm_args(attn)
    gemv = x.shape[0] == 1
    mode_in = _chain_mode(self, x, gemv)
    self._fused.qk_norm_rope_cache(_qkv(self, x, gemv, mode_in), qw, kw, freqs_cis, cache.k_cache,
                                   cache.v_cache, input_pos, attn.n_head, attn.n_kv_head, eps)
    if mode_in:  # no wo launch follows to reset the slot
        self._ss_in.zero_()


def _qkv(block: TransformerBlock, x: Tensor, gemv: bool, mode: str | None = None) -> Tensor:
    """wqkv(attention_norm(x)) [B, 1, width], the norm folded into the GEMV where the kernel can (mode, from
    `_chain_mode`: "ss", from the sum of squares the previous block's w2 left in block._ss_in; "gx", from that
    and x times the norm's weight in block._gx_in)."""
    norm = block.attention_norm
    if mode == "ss":
        return _linear(block.attention.wqkv, x, gemv, norm_ss=(block._ss_in, norm.weight, norm.eps))
    if mode == "gx":
        return _linear(block.attention.wqkv, block._gx_in.view(x.shape), gemv, rs_in=(block._ss_in, norm.eps))
    if _folds_norm(block.attention.wqkv, x):
        return _linear(block.attention.wqkv, x, gemv, norm=norm)
    return _linear(block.attention.wqkv, block._fused.rms_norm(x, norm.weight, norm.eps), gemv)


def _qk_norm_args(attn: nn.Module) -> tuple[Tensor | None, Tensor | None, float]:
    """(q-norm weight, k-norm weight, eps) for the attention kernels; (None, None, 0.0) without QK-norm."""
    if not attn.qk_norm:
        return None, None, 0.0
    return attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps


def is_enabled(module: nn.Module, x: Tensor) -> bool:
    """Whether `enable` swapped this module (a TransformerBlock or a final RMSNorm) and its kernels apply to x."""
    return "_fused" in module.__dict__ and _active(module, x)


def _bf16_gemv(weight: Tensor, x: Tensor, gemv: bool) -> bool:
    return gemv and weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16


def _linear(module: nn.Module, x: Tensor, gemv: bool, residual: Tensor | None = None,
            norm: RMSNorm | None = None, ss_out: Tensor | None = None, zero: Tensor | None = None,
            norm_ss: tuple | None = None, gx_out: tuple | None = None, rs_in: tuple | None = None) -> Tensor:
    """module(x), plus residual when given (added in the kernel's epilogue where a kernel runs: one launch fewer);
    norm (only where `_folds_norm(module, x)`): module(norm(x)) with the norm inside the kernel.
    The one-row norm chain (`kernels.ops.norm_chain_args`): ss_out gets the output's sum of squares, zero is reset,
    norm_ss (only where `_takes_norm_ss(module, x, gemv)`) = (ss, g, eps): module(rms_norm(x)) with the
    statistic read from ss; gx_out = (g, buf [1, N]): the output times g also goes to buf; rs_in (only where
    `_norm_mode` says "gx") = (ss, eps): x is already times the norm's weight, the kernel applies the rsqrt.
    A linear without a kernel does ss_out, zero and gx_out eagerly.

    A bias-free bf16 nn.Linear at one row (gemv) goes through the Triton GEMV instead of cuBLAS (faster at S2's
    shapes: bench/RESULTS.md); a QuantLinear with a kernel (CUDA) calls it directly."""
    chain = {k: v for k, v in (("ss_out", ss_out), ("zero", zero), ("norm_ss", norm_ss), ("gx_out", gx_out),
                               ("rs_in", rs_in)) if v is not None}
    if type(module) is nn.Linear and module.bias is None and _bf16_gemv(module.weight, x, gemv):
        from s2conv.runtime.kernels import KERNELS

        return KERNELS["bf16"](x, {"weight": module.weight}, residual=residual, **chain)
    if isinstance(module, QuantLinear) and module.kernel is not None and _kernel_runs(module, x):
        launcher, packed = module.kernel
        if norm is not None:
            return launcher(x, packed, residual=residual, norm=_norm_args(norm), **chain)
        return launcher(x, packed, residual=residual, **chain)
    assert norm_ss is None and rs_in is None, "norm_ss and rs_in are for linears that take them (_norm_mode)"
    y = module(x)
    y = y if residual is None else residual + y
    if zero is not None:
        zero.zero_()
    if ss_out is not None:
        ss_out.add_(y.float().pow(2).sum())
    if gx_out is not None:
        gx_out[1].copy_((y.float() * gx_out[0].float()).reshape(gx_out[1].shape))
    return y


def _takes_norm_ss(module: nn.Module, x: Tensor, gemv: bool) -> bool:
    """Whether module at this x runs a kernel that applies its input's RMSNorm from a sum of squares handed over
    by the producer of x (the float GEMVs: bf16, fp8, q8; one row)."""
    if not gemv:
        return False
    if type(module) is nn.Linear:
        return module.bias is None and _bf16_gemv(module.weight, x, gemv)
    return (isinstance(module, QuantLinear) and module.kernel is not None and _kernel_runs(module, x)
            and getattr(module.kernel[0], "takes_norm_ss", False))


def _ffn_takes_norm_ss(ff: nn.Module, w13, x: Tensor, gemv: bool) -> bool:
    """`_takes_norm_ss` for the joined w1|w3 of a feed-forward (`_w13`)."""
    if isinstance(w13, Tensor):
        return _bf16_gemv(w13, x, gemv)
    return gemv and isinstance(w13, tuple) and _kernel_runs(ff.w1, x) and getattr(w13[0], "takes_norm_ss", False)


def _norm_mode(module: nn.Module, x: Tensor, gemv: bool) -> str | None:
    """How module, a linear after an RMSNorm, applies that norm at one row without a norm launch: "ss" (the float
    GEMVs: the whole norm, from the sum of squares of x its producer leaves), "gx" (the integer GEMVs: x arrives
    times the norm's weight, which the producer also stores, and the kernel scales its output by the rsqrt of
    that sum), None (a norm launch first)."""
    if _takes_norm_ss(module, x, gemv):
        return "ss"
    if (gemv and isinstance(module, QuantLinear) and module.kernel is not None and _kernel_runs(module, x)
            and getattr(module.kernel[0], "takes_rs_in", False) and _INT_CHAIN):
        return "gx"
    return None


def _chain_mode(block: TransformerBlock, x: Tensor, gemv: bool) -> str | None:
    """`_norm_mode` of block's wqkv where its input x arrives with the chain's slots filled (_ss_in, and _gx_in
    for "gx"): the block has a predecessor in its stack, whose w2 writes them, deciding by this same test."""
    if block.__dict__.get("_prev_block") is None:
        return None
    mode = _norm_mode(block.attention.wqkv, x, gemv)
    return None if mode == "gx" and not _gx_fits(block._gx_in, x) else mode


def _gx_fits(slot: Tensor, x: Tensor) -> bool:
    """Whether a "gx" slot can hold x times a norm weight: x's dtype, and not fp16 (an un-normalised residual
    times the weight could overflow its range, where the norm's output would not)."""
    return slot.dtype == x.dtype and x.dtype != torch.float16


def _ffn_norm_mode(block: TransformerBlock, ff: nn.Module, w13, x: Tensor, gemv: bool) -> str | None:
    """`_norm_mode` for the joined w1|w3 of block's feed-forward (`_w13`)."""
    if _ffn_takes_norm_ss(ff, w13, x, gemv):
        return "ss"
    if (gemv and isinstance(w13, tuple) and _kernel_runs(ff.w1, x) and getattr(w13[0], "takes_rs_in", False)
            and _gx_fits(block._gx_mid, x) and _INT_CHAIN):
        return "gx"
    return None


def _kernel_runs(module: nn.Module, x: Tensor) -> bool:
    """Whether a QuantLinear's kernel takes x: CUDA inputs, or any after `prepare_kernel(force=True)` (tests)."""
    return x.is_cuda or getattr(module, "_kernel_on_cpu", False)


def _norm_args(norm: RMSNorm) -> tuple[Tensor, float]:
    return norm.weight, norm.eps


def _launcher_folds(launcher, x: Tensor, packed: dict) -> bool:
    fuses = getattr(launcher, "fuses_norm", None)
    return fuses is not None and fuses(x, packed)


def _folds_norm(module: nn.Module, x: Tensor) -> bool:
    """Whether module's kernel takes an RMSNorm of x inside its own launch (integer formats on the dp2a GEMV)."""
    return (isinstance(module, QuantLinear) and module.kernel is not None and _kernel_runs(module, x)
            and _launcher_folds(module.kernel[0], x, module.kernel[1]))


def _ffn(ff: nn.Module, x: Tensor, k, gemv: bool = False, residual: Tensor | None = None,
         ss_out: Tensor | None = None, zero: Tensor | None = None, norm_ss: tuple | None = None,
         gx_out: tuple | None = None, rs_in: tuple | None = None) -> Tensor:
    """[residual +] w2(silu(w1 x) * w3 x) through the cheapest path the w1/w3 modules allow. norm_ss or rs_in
    (only where `_ffn_norm_mode` says "ss" or "gx"): w1|w3 applies x's RMSNorm itself; ss_out, zero and gx_out go
    to w2 (`_linear`)."""
    w13 = _w13(ff)
    norm = {name: v for name, v in (("norm_ss", norm_ss), ("rs_in", rs_in)) if v is not None}
    if isinstance(w13, Tensor) and _bf16_gemv(w13, x, gemv):  # float pair: one GEMV on [w1; w3], silu*mul inside
        from s2conv.runtime.kernels import GATED_KERNELS

        a = GATED_KERNELS["bf16"](x, {"weight": w13}, **norm)
    elif isinstance(w13, tuple) and _kernel_runs(ff.w1, x):  # QuantLinear pair with kernels: silu*mul inside
        launcher, packed = w13
        a = launcher(x, packed, **norm)
    else:
        assert not norm, "norm_ss and rs_in are for w1|w3 kernels that take them (_ffn_norm_mode)"
        if isinstance(w13, Tensor):
            h1, h3 = F.linear(x, w13).split(w13.shape[0] // 2, dim=-1)
            a = k.silu_mul(h1, h3)
        else:
            a = k.silu_mul(ff.w1(x), ff.w3(x))
    return _linear(ff.w2, a, gemv, residual, ss_out=ss_out, zero=zero, gx_out=gx_out)


# ---- w1 | w3 concatenation ---------------------------------------------------------------------------------------
def _w13_key(ff: nn.Module) -> tuple:
    return ff.w1, ff.w3, ff.w1.weight, ff.w3.weight, getattr(ff.w1, "kernel", None), getattr(ff.w3, "kernel", None)


def _w13(ff: nn.Module):
    """The joined w1 | w3 of `_join_w13`, rebuilt when w1 / w3 (modules, weights or kernels) changed since the
    last join, e.g. a loader quantized or re-prepared them after `enable`."""
    cached = ff.__dict__.get("_fused_w13")
    if cached is None or any(a is not b for a, b in zip(cached[0], _w13_key(ff))):
        joined = _join_w13(ff)
        cached = ff._fused_w13 = (_w13_key(ff), joined)
    return cached[1]


def _join_w13(ff: nn.Module):
    """Concatenate w1 over w3 once; w1 and w3 then read views of the joined storage (no second copy in memory).

    Returns the joined float weight [2 hidden, dim], a (gated launcher, joined packed dict) pair for two
    QuantLinears with kernels of one format, or None (w1 and w3 are then called one after the other)."""
    w1, w3 = ff.w1, ff.w3
    if type(w1) is nn.Linear and type(w3) is nn.Linear:
        a, b = w1.weight, w3.weight
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.is_meta:
            return None
        joined = torch.cat([a, b], dim=0)
        w1.weight = nn.Parameter(joined[: a.shape[0]], requires_grad=False)
        w3.weight = nn.Parameter(joined[a.shape[0]:], requires_grad=False)
        return joined
    if isinstance(w1, QuantLinear) and isinstance(w3, QuantLinear) and w1.kernel and w3.kernel \
            and w1.fmt.name == w3.fmt.name and w1.out_features == w3.out_features:
        from s2conv.runtime.kernels import GATED_KERNELS, cat_rows, split_rows

        gated = GATED_KERNELS.get(w1.fmt.name)
        if gated is None:
            return None
        (l1, p1), (l3, p3) = w1.kernel, w3.kernel
        joined = cat_rows(p1, p3)  # every tensor is stacked on its own dim 0: w1 is each one's first half
        half1, half3 = split_rows(joined)
        w1.kernel, w3.kernel = (l1, half1), (l3, half3)
        return gated, joined
    return None


# ---- public API --------------------------------------------------------------------------------------------------
def enable(model: nn.Module, force: bool = False) -> bool:
    """Route every TransformerBlock's decode step and the final RMSNorms of `model` through the fused kernels.

    Without `force` this happens only for a CUDA model and applies to CUDA inputs; `force=True` also runs the
    kernels on CPU tensors (tests, with TRITON_INTERPRET=1). Returns whether the swap happened. Idempotent."""
    kernels = _fused()
    if kernels is None:
        return False
    params = next(model.parameters(), None)
    if not force and (params is None or not params.is_cuda):
        return False
    n_blocks = 0
    # the blocks' own RMSNorms take the kernel too: the fused decode step reads their weights directly, and prefill
    # (S > 1) then runs one norm launch instead of ~7 elementwise kernels
    in_blocks = {id(m) for b in model.modules() if isinstance(b, TransformerBlock) for m in b.modules()}
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.forward = types.MethodType(_block_forward, module)
            module.fill_cache = types.MethodType(_block_fill_cache, module)
            _w13(module.feed_forward)  # join now, outside any CUDA-graph capture
            # the one-row norm chain's slots: sums of squares of the block's input and of h (`decode_block`)
            dev = module.attention_norm.weight.device
            module._ss_in = torch.zeros(1, dtype=torch.float32, device=dev)
            module._ss_mid = torch.zeros(1, dtype=torch.float32, device=dev)
            # ... and for integer GEMVs the block's input and h times their norms' weights (one row)
            g = module.attention_norm.weight
            module._gx_in = torch.zeros(1, g.shape[0], dtype=g.dtype, device=dev)
            module._gx_mid = torch.zeros(1, g.shape[0], dtype=g.dtype, device=dev)
            n_blocks += 1
        elif type(module) is RMSNorm:  # the final norms (slow, fast) and the blocks' attention and ffn norms
            module.forward = types.MethodType(_norm_forward, module)
        elif (type(module) is nn.Linear and id(module) not in in_blocks and module.bias is None
              and module.weight.dtype == torch.bfloat16):  # the fast AR's head: cuBLAS took 9.6 us a row
            module.forward = types.MethodType(_head_forward, module)
        else:
            continue
        module._fused, module._fused_force = kernels, force
    for stack in model.modules():  # each stack's blocks in order (slow AR, fast AR): who writes whose _ss_in
        if isinstance(stack, nn.ModuleList) and stack and all(isinstance(b, TransformerBlock) for b in stack):
            for a, b in zip(stack, stack[1:]):  # plain attributes, not submodules (that would make a cycle)
                a.__dict__["_next_block"], b.__dict__["_prev_block"] = b, a
    _join_semantic_head(model, force)
    _install_frame_ops(model, force)
    log.info("fused decode enabled on %d transformer blocks", n_blocks)
    return True


def _join_semantic_head(model: nn.Module, force: bool) -> None:
    """A model with `semantic_logits` over a tied bf16 embedding (DualARTransformer) gets the head's rows joined
    once (semantic tokens, then <|im_end|>: 21 MB at S2's shapes) and `_semantic_logits` in place of the method.
    The copy is keyed on the embedding's storage and version: new weights (load_state_dict) or a move join it
    again at the next call (outside CUDA-graph capture, as any weight change must be)."""
    emb = getattr(getattr(model, "embeddings", None), "weight", None)
    cfg = getattr(model, "cfg", None)
    if emb is None or cfg is None or not hasattr(model, "semantic_logits") or emb.dtype != torch.bfloat16:
        return
    if "semantic_logits" in model.__dict__ and "_semantic_head" not in model.__dict__:
        return  # the instance already has a semantic_logits of its own: left as it is
    with torch.no_grad():
        head = torch.cat([emb[cfg.semantic_begin_id: cfg.semantic_end_id + 1],
                          emb[cfg.eos_token_id: cfg.eos_token_id + 1]]).contiguous()
    model.__dict__.update(_semantic_head=head, _semantic_head_force=force, _semantic_head_key=(emb.data_ptr(),
                                                                                               emb._version),
                          semantic_logits=types.MethodType(_semantic_logits, model))


def _install_frame_ops(model: nn.Module, force: bool) -> None:
    """A DualARTransformer gets the frame's small steps in one launch each (`kernels.frame`): `embed` of decode
    columns (CUDA only: its rounding is eager CUDA's), `sample_main` with RAS, and the frame loop's bookkeeping
    (`frame_loop.FrameLoop` looks for `_frame_ops`). S2CONV_FRAME_OPS=0 leaves them out."""
    if not all(hasattr(model, a) for a in ("cfg", "embed", "sample_main", "codebook_embeddings")) \
            or os.environ.get("S2CONV_FRAME_OPS", "1") == "0":
        return
    try:
        from s2conv.runtime.kernels import frame
    except ImportError as e:
        log.info("frame kernels unavailable: %s", e)
        return
    model.__dict__.update(_frame_ops=frame, _frame_ops_force=force, embed=types.MethodType(_embed, model),
                          sample_main=types.MethodType(_sample_main, model))


def disable(model: nn.Module) -> None:
    """Restore the eager forwards. w1 / w3 keep reading views of the joined weight (same values)."""
    if "_frame_ops" in model.__dict__:
        for name in ("_frame_ops", "_frame_ops_force", "embed", "sample_main"):
            model.__dict__.pop(name, None)
    if "_semantic_head" in model.__dict__:  # only what `_join_semantic_head` installed
        for name in ("semantic_logits", "_semantic_head", "_semantic_head_force", "_semantic_head_key"):
            model.__dict__.pop(name, None)
    for module in model.modules():
        if "_fused" in module.__dict__:
            del module.forward, module._fused, module._fused_force
            if "fill_cache" in module.__dict__:
                del module.fill_cache
            for name in ("_ss_in", "_ss_mid", "_gx_in", "_gx_mid", "_next_block", "_prev_block"):
                module.__dict__.pop(name, None)
