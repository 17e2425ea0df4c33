"""Compile a model's Triton kernels before its first synthesis, all at once.

Triton compiles a kernel when it is first launched with new specializations, so a fresh process compiles the
20-30 kernels of a prefill and a frame one after another (10-25 s with an empty Triton cache, most of it in the
small-M GEMMs of the prefill). `compile_kernels` dry-runs a prefill and one frame with every Triton launch noted
instead of run (`kernels.launch.recording`; the outputs they would write read as zeros), then compiles all the
noted kernels concurrently on a thread pool. Kernels already in the cache cost a lookup.
"""
from __future__ import annotations

import torch

from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.frame_loop import SPAN_STEP, FrameLoop
from s2conv.runtime.kernels.launch import compile_launches, recording
from s2conv.runtime.sampling import SamplingParams

# prompt lengths whose prefill kernels are compiled. The small-M GEMM's tile height (16, 32 or 64 rows) and whether
# it splits K (`ops.default_config`: about 3 waves of tiles) follow the prompt length; at S2's shapes these cover
# every variant from 17 tokens up (32: 32-row tiles; 64: 64-row tiles, every linear split; 256: wqkv whole, wo and
# w2 split, as up to 384 tokens; 512: nothing split, as from 448 tokens: typical voice-cloning prompts)
PROMPT_LENGTHS = (32, 64, 256, 512)


@torch.inference_mode()
def compile_kernels(model: DualARTransformer, prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS,
                    params: SamplingParams = SamplingParams(), threads: int | None = None) -> int:
    """Compile the Triton kernels of prefills of `prompt_lengths` tokens and of a frame after each, concurrently.

    Returns the number of kernel launches the dry run noted (0 on the CPU or without triton: nothing to compile).
    The dry run writes the KV caches (zeros); every generation prefills its own positions first."""
    if model.norm.weight.device.type != "cuda":
        return 0
    return compile_launches(record_launches(model, prompt_lengths, params), threads)


@torch.inference_mode()
def record_launches(model: DualARTransformer, prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS,
                    params: SamplingParams = SamplingParams()) -> list:
    """The Triton launches (kernel, grid, args, kwargs) of prefills of `prompt_lengths` tokens and a frame after
    each, noted by a dry run that launches none of them."""
    cfg, device = model.cfg, model.norm.weight.device
    lengths = [t for t in prompt_lengths if 0 < t < cfg.max_seq_len - 1]
    if not lengths:
        return []
    with recording() as noted:
        for t in lengths:  # a prefill, then a frame at the attention span it leads to (the span sets the split)
            model.setup_caches(1, t + 2)
            prompt = torch.zeros(1, cfg.num_codebooks + 1, t, dtype=torch.long, device=device)
            hidden, logits = model.prefill(prompt)
            loop = FrameLoop(model, params, 2, use_graphs=False)
            loop.column.copy_(model.sample_frame(hidden, logits, params, None)[:, :, None])
            loop.pos.fill_(t)
            loop._step(min(model.max_seq, -(-(t + 1) // SPAN_STEP) * SPAN_STEP))
    return noted
