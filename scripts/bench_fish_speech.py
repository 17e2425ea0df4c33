"""Baseline: fish-speech's own decode step (`decode_one_token_ar`) at S2 Pro shapes, eager, random bf16 weights.

Needs the `fish-speech` package (0.1.0 from the package registry) and its light imports (einops, loguru, loralib,
tiktoken, transformers). Its DualARTransformer is the code S2's inference grew from; built here with S2 Pro's
shapes (36 + 4 layers, dim 2560, GQA 32/8, head_dim 128, FFN 9728, vocab 155,776, 10 codebooks of 4096).
fish-speech's `torch.compile(mode="reduce-overhead")` variant needs ~8 minutes of compilation: pass --compile to try.

    python scripts/bench_fish_speech.py --frames 20
"""
from __future__ import annotations

import argparse
import time

import torch


class _Tokenizer:
    """The attributes fish-speech's model reads from its tokenizer (S2 Pro's ids)."""

    semantic_begin_id, semantic_end_id = 151678, 155773
    semantic_id_to_token_id = {i: 151678 + i for i in range(4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    from fish_speech.models.text2semantic import inference as fs
    from fish_speech.models.text2semantic.llama import DualARModelArgs, DualARTransformer

    cfg = DualARModelArgs(vocab_size=155776, n_layer=36, n_head=32, n_local_heads=8, head_dim=128, dim=2560,
                          intermediate_size=9728, rope_base=1_000_000, norm_eps=1e-6, max_seq_len=2048,
                          attention_qk_norm=True, codebook_size=4096, num_codebooks=10, n_fast_layer=4,
                          fast_attention_qk_norm=False, scale_codebook_embeddings=True,
                          use_gradient_checkpointing=False)
    with torch.device("cuda"):
        model = DualARTransformer(cfg, _Tokenizer()).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.device("cuda"):
        model.setup_caches(1, 2048, dtype=torch.bfloat16)
    step = fs.decode_one_token_ar
    if args.compile:
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    x = torch.zeros(1, 11, 1, dtype=torch.long, device="cuda")
    x[0, 0] = 151678 + 7
    t = torch.tensor(0.8, device="cuda", dtype=torch.bfloat16)
    p = torch.tensor(0.8, device="cuda", dtype=torch.bfloat16)
    r = torch.tensor(1.0, device="cuda", dtype=torch.bfloat16)
    prev = torch.zeros(11, 16, dtype=torch.int, device="cuda")
    times = []
    with torch.inference_mode(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        for i in range(args.frames + 3):
            pos = torch.tensor([256 + i], device="cuda", dtype=torch.long)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, x, pos, t, p, r, None, None, prev)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    ms = sorted(times[3:])[len(times[3:]) // 2] * 1e3
    print(f"fish-speech 0.1.0 decode_one_token_ar ({'compiled' if args.compile else 'eager'}), "
          f"{n_params / 1e9:.3f}B params, {torch.cuda.get_device_name()}: {ms:.2f} ms/frame = {1e3 / ms:.1f} frames/s")


if __name__ == "__main__":
    main()
