"""Profile one decode frame at full S2 Pro shapes: CUDA kernel count and time by kernel, eager and graph-replayed."""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile


from s2conv.bench import build_model, quantize_model  # noqa: E402
from s2conv.runtime.frame_loop import FrameLoop  # noqa: E402
from s2conv.runtime.sampling import SamplingParams  # noqa: E402
from s2conv.schema import S2Config  # noqa: E402


@torch.inference_mode()
def main(fmt: str = "bf16") -> None:
    model = build_model(S2Config())
    if fmt != "bf16":
        quantize_model(model, fmt, "all")
    cfg = model.cfg
    params = SamplingParams()
    prompt = torch.randint(0, cfg.semantic_begin_id, (1, cfg.num_codebooks + 1, 256), device="cuda")
    prompt[:, 1:] = 0
    model.setup_caches(1, 512)
    hidden, logits = model.prefill(prompt)
    first = model.sample_frame(hidden, logits, params, None)
    loop = FrameLoop(model, params, 8, use_graphs=True)
    loop.run(first, 256, 8, model.max_seq)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loop.run(first, 256, 8, model.max_seq)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"{fmt}: 7 graphed frames: {count / 7:.0f} kernels/frame, {total / 7 / 1e3:.2f} ms GPU time/frame")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / 7 / 1e3:8.3f} ms {e.count / 7:6.0f}x  {e.key[:110]}")


if __name__ == "__main__":
    for f in sys.argv[1:] or ["bf16"]:
        main(f)
