"""Compile a model's Triton kernels before its first synthesis, all at once.

Triton compiles a kernel when it is first launched with new specializations, so a fresh process compiles the
20-30 kernels of a prefill and a frame one after another (10-25 s with an empty Triton cache, most of it in the
small-M GEMMs of the prefill). `compile_kernels` dry-runs prefills and frames with every Triton launch noted
instead of run (`kernels.launch.recording`; the outputs they would write read as zeros), then compiles all the
noted kernels concurrently on a thread pool. Kernels already in the cache cost a lookup.
"""
from __future__ import annotations

import torch

from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.frame_loop import SPAN_STEP, FrameLoop
from s2conv.runtime.kernels.launch import compile_launches, recording
from s2conv.runtime.sampling import SamplingParams

# prompt lengths whose prefill kernels are compiled, and the frames after them. The small-M GEMM's tile height (16,
# 32 or 64 rows) and whether it splits K (`ops.default_config`) follow the prompt length up to
# `dequant.PREFILL_M` (32: 32-row tiles; 64: 64-row tiles, every linear split); from there on the weights are
# dequantized once for cuBLAS (256). The frame after each prefill compiles the attention of its span: 512 and 768
# keys for the kernel per query head, 1536 (after 1280 tokens: voice-cloning prompts) for the one per KV head
PROMPT_LENGTHS = (32, 64, 256, 512, 1280)


@torch.inference_mode()
def compile_kernels(model: DualARTransformer, prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS,
                    params: SamplingParams = SamplingParams(), threads: int | None = None) -> int:
    """Compile the Triton kernels of prefills of `prompt_lengths` tokens and of a frame after each, concurrently.

    Returns the number of distinct launches compiled (`kernels.launch.distinct_launches`; 0 on the CPU: nothing to
    compile).
    The dry run writes the KV caches (zeros); every generation prefills its own positions first."""
    if model.norm.weight.device.type != "cuda":
        return 0
    return compile_launches(record_launches(model, prompt_lengths, params), threads)


@torch.inference_mode()
def record_launches(model: DualARTransformer, prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS,
                    params: SamplingParams = SamplingParams()) -> list:
    """The Triton launches (kernel, grid, args, kwargs) of prefills of `prompt_lengths` tokens and a frame after
    each, noted by a dry run that launches none of them."""
    lengths = [t for t in prompt_lengths if 0 < t < model.cfg.max_seq_len - 1]
    if not lengths:
        return []
    # the dry run sizes the KV caches for its prompts; the model gets its own caches back afterwards, so that a
    # generation sizes them as it would have (the attention span, and with it the order of its sums, follows them)
    blocks = [*model.layers, *model.fast_layers]
    saved = [b.attention.kv_cache for b in blocks], model.max_batch, model.max_seq, model.cache_version
    with recording() as noted:
        try:
            _dry_run(model, lengths, params)
        finally:
            for b, cache in zip(blocks, saved[0]):
                b.attention.kv_cache = cache
            model.max_batch, model.max_seq, model.cache_version = saved[1:]
    return noted


def _dry_run(model: DualARTransformer, lengths: list[int], params: SamplingParams) -> None:
    """A prefill of each length, then a frame at the attention span it leads to (the span sets the split)."""
    cfg, device = model.cfg, model.norm.weight.device
    for t in lengths:
        # caches of the frame's whole span bucket: a generation's caches usually reach past it, so the frame's
        # attention then reads a span that is a multiple of SPAN_STEP (triton specializes on such sizes)
        model.setup_caches(1, min(cfg.max_seq_len, -(-(t + 2) // SPAN_STEP) * SPAN_STEP))
        prompt = torch.zeros(1, cfg.num_codebooks + 1, t, dtype=torch.long, device=device)
        hidden, logits = model.prefill(prompt)
        loop = FrameLoop(model, params, 2, use_graphs=False)
        loop.column.copy_(model.sample_frame(hidden, logits, params, None)[:, :, None])
        loop.pos.fill_(t)
        loop._step(min(model.max_seq, -(-(t + 1) // SPAN_STEP) * SPAN_STEP))
