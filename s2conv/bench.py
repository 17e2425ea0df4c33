"""Batch-1 decode speed of the full S2 Pro shapes on one GPU: ms/frame, frames/s, real-time factor, GB/s.

Builds the model with random weights directly on the device (quantized formats: one quantized template per matrix
shape, copied into every layer so each layer reads its own bytes), then times the runtime's real decode path
(`s2conv.runtime.frame_loop`, whole-frame CUDA graphs) per format and target, beside the measured HBM read
bandwidth and the codec decoder, in the same run. Before timing a format it checks one linear of each shape against
the reference path (dequantize, then an fp32 matmul) on fresh random inputs; a mismatch fails the run. The baseline,
fish-speech's own decode step at the same shapes (`--fish-speech eager,compiled`; needs the `fish-speech` package),
runs in the same process. Each format also reports the first frame of a --prompt-token prompt (prefill plus the
first frame, kernels compiled: the latency before audio can start). With --results FILE, appends a dated Markdown
section to FILE.

    s2conv bench --formats bf16,q8,q4,q4_k_m --targets slow,all --frames 200  (or: python scripts/bench_decode.py ...)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
from torch import nn

from s2conv.converter.policy import MIXES, ModelDims, Policy
from s2conv.quant_formats import get_format
from s2conv.runtime import fused_decode
from s2conv.runtime.batch import BatchLoop, left_pad, prefill_batch
from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.frame_loop import FrameLoop
from s2conv.runtime.qlinear import QuantLinear
from s2conv.runtime.sampling import SamplingParams
from s2conv.runtime.warmup import PROMPT_LENGTHS, compile_kernels
from s2conv.schema import S2Config, CodecConfig

FRAME_HZ = 44100 / 2048


def hbm_read_bandwidth(gib: float = 4.0) -> dict:
    """GB/s of a read-only reduction and of a device-to-device copy (read + write bytes) over `gib` GiB."""
    n = int(gib * 2**30 / 2)
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    out = {}
    for name, fn, nbytes in (("read", lambda: x.sum(dtype=torch.float32), x.numel() * 2),
                             ("copy", lambda: y.copy_(x), x.numel() * 4)):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        out[name] = nbytes / sorted(times)[len(times) // 2] / 1e9
    del x, y
    torch.cuda.empty_cache()
    return out


def build_model(cfg: S2Config) -> DualARTransformer:
    """Random bf16 weights at the given shapes, created on the GPU (fan-in scaled normal; norms ~1)."""
    with torch.device("meta"):
        model = DualARTransformer(cfg)
    weights = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, p in model.state_dict().items():
        if p.ndim == 1:
            weights[name] = 1 + 0.1 * torch.randn(p.shape, device="cuda", generator=g)
        else:
            std = 1.0 if "embeddings" in name else p.shape[1] ** -0.5
            weights[name] = torch.randn(p.shape, device="cuda", generator=g, dtype=torch.bfloat16) * std
    model.load_weights({k: v.to(torch.bfloat16) for k, v in weights.items()})
    fused_decode.enable(model)  # the runtime's decode path (also after quantize_model: w1|w3 rejoin lazily)
    return model


def linear_modules(model: DualARTransformer, target: str):
    """(checkpoint name of the weight, parent module, attribute) of every target Linear."""
    stacks = [("layers", model.layers)] + ([("fast_layers", model.fast_layers)] if target == "all" else [])
    for prefix, layers in stacks:
        for i, layer in enumerate(layers):
            for block, attr in (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"),
                                ("feed_forward", "w3"), ("feed_forward", "w2")):
                yield f"{prefix}.{i}.{block}.{attr}.weight", getattr(layer, block), attr


def format_chooser(type_name: str, target: str, cfg: S2Config):
    """name, shape -> the format of that Linear: `type_name` everywhere, or for a llama-quantize mix (q4_k_m,
    q5_k_s, ...; q2_k stays the plain format here) the per-layer choice `s2conv export --type` makes."""
    if type_name not in MIXES or type_name == "q2_k":
        get_format(type_name)  # an unknown name fails here, before any work
        return lambda name, shape: type_name
    policy = Policy(type=type_name, target=target, dims=ModelDims.from_config(cfg))
    return lambda name, shape: policy.choose(name, shape, "bf16").format


def quantize_model(model: DualARTransformer, type_name: str, target: str) -> list:
    """Swap target Linears for QuantLinears (templates quantized once per format and shape). Returns the undo
    list."""
    choose = format_chooser(type_name, target, model.cfg)
    templates, undo = {}, []
    for name, parent, attr in linear_modules(model, target):
        lin = getattr(parent, attr)
        shape = tuple(lin.weight.shape)
        fmt = get_format(choose(name, shape))
        if (fmt.name, shape) not in templates:
            w = lin.weight.float().cpu().numpy()
            templates[fmt.name, shape] = torch.from_numpy(fmt.quantize(w)).to(lin.weight.device)
        q = QuantLinear(fmt, shape[1], shape[0])
        q.weight = templates[fmt.name, shape].clone()
        q.prepare_kernel()
        setattr(parent, attr, q)
        undo.append((parent, attr, lin))
    return undo


def format_counts(model: DualARTransformer, target: str) -> dict:
    """How many target Linears each format holds ("bf16" for plain Linears)."""
    counts = {}
    for _, parent, attr in linear_modules(model, target):
        m = getattr(parent, attr)
        key = m.fmt.name if isinstance(m, QuantLinear) else "bf16"
        counts[key] = counts.get(key, 0) + 1
    return counts


def bytes_per_frame(model: DualARTransformer, span: int) -> int:
    """Weight + KV bytes one frame reads: the slow AR once, the fast AR 10 times, the head slices."""
    cfg = model.cfg

    def nbytes(m: nn.Module) -> int:
        if isinstance(m, QuantLinear):  # the kernel layout once prepared (its storage bytes are freed then)
            return m.resident_bytes()
        return m.weight.numel() * m.weight.element_size()

    def layer_bytes(layer) -> int:
        a, f = layer.attention, layer.feed_forward
        return sum(nbytes(m) for m in (a.wqkv, a.wo, f.w1, f.w3, f.w2))

    slow = sum(layer_bytes(l) for l in model.layers)
    fast = sum(layer_bytes(l) for l in model.fast_layers)
    head = (cfg.semantic_end_id - cfg.semantic_begin_id + 2) * cfg.dim * 2
    kv = cfg.n_layer * 2 * cfg.n_local_heads * span * cfg.head_dim * 2
    return slow + head + kv + cfg.num_codebooks * fast + (cfg.num_codebooks - 1) * nbytes(model.fast_output)


def output_error(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool]:
    """(relative error (Frobenius), max |error| / max |ref|, ok) of a kernel output y against its fp32 reference;
    ok: within what rounding the output to bf16 explains (~2e-3 relative rms)."""
    diff = y.float() - ref
    err = (diff.norm() / ref.norm()).item()
    max_rel = (diff.abs().max() / ref.abs().max()).item()
    return err, max_rel, err < 4e-3 and max_rel < 1e-2


@torch.inference_mode()
def check_linears(model: DualARTransformer, target: str) -> dict:
    """The fused kernels of one linear per weight shape against the reference path on a fresh random x [1, K]:
    the worst of `output_error` over the shapes. Quantized linears run their `QuantLinear` kernel against its
    dequantized weight; plain bf16 linears the bf16 GEMV that decoding uses at one row against an fp32 matmul."""
    from s2conv.runtime.kernels import KERNELS

    seen, err, max_rel, ok = set(), 0.0, 0.0, True
    for _, parent, attr in linear_modules(model, target):
        q = getattr(parent, attr)
        quantized = isinstance(q, QuantLinear) and q.kernel is not None
        plain = type(q) is nn.Linear and q.bias is None and q.weight.dtype == torch.bfloat16 and "bf16" in KERNELS
        key = (q.in_features, q.out_features, q.fmt.name if quantized else "bf16")
        if not (quantized or plain) or key in seen:
            continue
        seen.add(key)
        dev = q.weight.device
        g = torch.Generator(device=dev).manual_seed(len(seen))
        x = torch.randn(1, q.in_features, device=dev, generator=g).to(torch.bfloat16)
        if quantized:
            y, w = q(x), q.dequantized(torch.float32)
        else:
            y, w = KERNELS["bf16"](x, {"weight": q.weight}), q.weight.float()
        e, m, good = output_error(y, x.float() @ w.T)
        err, max_rel, ok = max(err, e), max(max_rel, m), ok and good
    return dict(shapes=len(seen), rel_err=err, max_rel=max_rel, ok=ok)


def time_fish_speech(compiled: bool, frames: int = 20, prompt_len: int = 256) -> dict:
    """fish-speech's decode step (`decode_one_token_ar`: one slow-AR step and the fast AR's 10 codebooks) on its own
    `DualARTransformer` built at S2 Pro's shapes with random bf16 weights, eager or under
    `torch.compile(mode="reduce-overhead", fullgraph=True)` as its `init_model` does. Median seconds per frame after
    3 warm-up frames, and the first call's seconds (compilation and graph capture when compiled). Needs the
    `fish-speech` package (0.1.0 from the package registry) and its light imports (einops, loguru, loralib)."""
    from fish_speech.models.text2semantic import inference as fs
    from fish_speech.models.text2semantic.llama import DualARModelArgs, DualARTransformer as FishDualAR

    class Tokenizer:  # the attributes fish-speech's model reads from its tokenizer (S2 Pro's ids)
        semantic_begin_id, semantic_end_id = 151678, 155773
        semantic_id_to_token_id = {i: 151678 + i for i in range(4096)}

    c = S2Config()
    args = DualARModelArgs(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_local_heads=c.n_local_heads,
                           head_dim=c.head_dim, dim=c.dim, intermediate_size=c.intermediate_size,
                           rope_base=c.rope_base, norm_eps=c.norm_eps, max_seq_len=2048, attention_qk_norm=True,
                           codebook_size=c.codebook_size, num_codebooks=c.num_codebooks, n_fast_layer=c.n_fast_layer,
                           fast_attention_qk_norm=False, scale_codebook_embeddings=True,
                           use_gradient_checkpointing=False)
    with torch.device("cuda"):
        model = FishDualAR(args, Tokenizer()).to(torch.bfloat16).eval()
        model.setup_caches(1, 2048, dtype=torch.bfloat16)
    step = fs.decode_one_token_ar
    if compiled:
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    x = torch.zeros(1, c.num_codebooks + 1, 1, dtype=torch.long, device="cuda")
    x[0, 0] = Tokenizer.semantic_begin_id + 7
    t, p, r = (torch.tensor(v, device="cuda", dtype=torch.bfloat16) for v in (0.8, 0.8, 1.0))
    prev = torch.zeros(c.num_codebooks + 1, 16, dtype=torch.int, device="cuda")
    times = []
    try:
        with torch.inference_mode(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            for i in range(frames + 3):
                pos = torch.tensor([prompt_len + i], device="cuda", dtype=torch.long)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(model, x, pos, t, p, r, None, None, prev)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    finally:
        del model
        torch.cuda.empty_cache()
    spf = sorted(times[3:])[len(times[3:]) // 2]
    return dict(compiled=compiled, ms_per_frame=spf * 1e3, frames_per_s=1 / spf, rtf=FRAME_HZ * spf,
                first_call_s=times[0])


@torch.inference_mode()
def time_decode(model: DualARTransformer, prompt_len: int, frames: int, repeats: int = 3) -> tuple[float, float]:
    """(median seconds per frame of the graph-replayed frame loop, after a warm-up run that captures the graphs;
    seconds of one-time work before steady decoding: prefill plus the first run's excess over its frames at the
    median rate, i.e. kernel compilation not done before and CUDA-graph capture)."""
    cfg = model.cfg
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=30)
    g = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.zeros(1, cfg.num_codebooks + 1, prompt_len, dtype=torch.long, device="cuda")
    prompt[:, 0] = torch.randint(0, cfg.semantic_begin_id, (prompt_len,), device="cuda", generator=g)
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    model.setup_caches(1, prompt_len + frames + 8)
    hidden, logits = model.prefill(prompt)
    first = model.sample_frame(hidden, logits, params, None)
    loop = FrameLoop(model, params, frames, use_graphs=True)
    times, counts = [], []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = loop.run(first, prompt_len, frames, model.max_seq)
        torch.cuda.synchronize()
        if not times:
            first_end = time.perf_counter()
        times.append((time.perf_counter() - t0) / max(1, out.shape[1]))
        counts.append(out.shape[1])
        if out.shape[1] < frames:
            print(f"  (stopped early at {out.shape[1]} frames: <|im_end|> sampled)")
    spf = sorted(times[1:])[len(times[1:]) // 2]
    return spf, first_end - t_start - counts[0] * spf


@torch.inference_mode()
def time_first_frame(model: DualARTransformer, prompt_len: int, repeats: int = 5) -> float:
    """Median seconds from a prompt of prompt_len tokens to its first frame (the prefill through the slow AR and
    the first frame's sampling and fast AR; kernels already compiled), over `repeats` runs after a warm-up."""
    cfg = model.cfg
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=30)
    g = torch.Generator(device="cuda").manual_seed(2)
    prompt = torch.zeros(1, cfg.num_codebooks + 1, prompt_len, dtype=torch.long, device="cuda")
    prompt[:, 0] = torch.randint(0, cfg.semantic_begin_id, (prompt_len,), device="cuda", generator=g)
    model.setup_caches(1, prompt_len + 8)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden, logits = model.prefill(prompt)
        model.sample_frame(hidden, logits, params, None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.inference_mode()
def time_codec(n_frames: int = 256) -> dict:
    """The full-size codec decoder (random weights, bf16) on n_frames frames at batch 1."""
    from s2conv.codec_schema import folded_codec_tensor_shapes
    from s2conv.runtime.codec import Codec

    cc = CodecConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, shape in folded_codec_tensor_shapes(cc).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        w = torch.randn(shape, device="cuda", generator=g) * (fan_in ** -0.5 if len(shape) > 1 else 0.1)
        if name.endswith("alpha") or name.endswith("norm.weight"):
            w = w.abs() + 1
        weights[name] = w
    codec = Codec.from_weights(cc, weights, dtype=torch.bfloat16, device="cuda")
    codes = torch.randint(0, 1024, (1, cc.n_codebooks, n_frames), device="cuda", generator=g)
    audio_s = n_frames * cc.frame_length / cc.sample_rate
    out = {"frames": n_frames}
    # cuDNN's per-shape algorithm search (torch.backends.cudnn.benchmark) off and on, then the decode replayed
    # from a CUDA graph (as `decode_streaming(graphed=True)` does per fixed-size chunk)
    for key, autotune, graphed in (("default", False, False), ("cudnn_benchmark", True, False),
                                   ("cuda_graph", True, True)):
        torch.backends.cudnn.benchmark = autotune
        codec.decode(codes, graphed=graphed)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            codec.decode(codes, graphed=graphed)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = sorted(times)[2]
        out[key] = {"seconds": t, "x_realtime": audio_s / t}
    torch.backends.cudnn.benchmark = False
    out["seconds"], out["x_realtime"] = out["cudnn_benchmark"]["seconds"], out["cudnn_benchmark"]["x_realtime"]
    return out


@torch.inference_mode()
def time_decode_batch(model: DualARTransformer, prompt_len: int, frames: int, batch: int, repeats: int = 3) -> float:
    """Median aggregate frames/s of the batched loop (`s2conv.runtime.batch`: fused decode kernels, CUDA graphs)
    over `batch` prompts of lengths prompt_len, prompt_len - 16, ... (left-padded), counting every row's frames."""
    cfg = model.cfg
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=30)
    g = torch.Generator(device="cuda").manual_seed(1)
    prompts = []
    for i in range(batch):
        n = max(1, prompt_len - 16 * i)
        p = torch.zeros(cfg.num_codebooks + 1, n, dtype=torch.long, device="cuda")
        p[0] = torch.randint(0, cfg.semantic_begin_id, (n,), device="cuda", generator=g)
        prompts.append(p)
    tokens, offsets = left_pad(prompts)
    # caches of `batch` rows: the next batch-1 timing's `setup_caches` reallocates its own
    first = prefill_batch(model, tokens, offsets, frames + 8, params)
    loop = BatchLoop(model, params, offsets, frames, use_graphs=True)
    rates = []
    for _ in range(repeats + 1):  # the first run captures the graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = loop.run(first, tokens.shape[2], frames)
        torch.cuda.synchronize()
        rates.append(batch * n / (time.perf_counter() - t0))
    return sorted(rates[1:])[len(rates[1:]) // 2]


def append_markdown(path: str, result: dict) -> None:
    """Append one dated section (GPU, bandwidth, one row per format and target) to a Markdown results file."""
    bw = result["hbm"]
    lines = ["", f"## {result['date']}, {result['gpu']} (`s2conv bench`, torch {result['torch']})", "",
             f"Measured read bandwidth {bw['read']:.0f} GB/s; prompt {result['prompt']}, {result['frames']} frames.", "",
             "| format | target | ms/frame | frames/s | RTF | read share | batched frames/s (aggregate) "
             "| ready after (s) | first frame (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fs in result.get("fish_speech", []):
        mode = "compiled (reduce-overhead)" if fs["compiled"] else "eager"
        lines.append(f"| fish-speech 0.1.0 step, {mode} (baseline, first call {fs['first_call_s']:.0f} s) | - | "
                     f"{fs['ms_per_frame']:.2f} | {fs['frames_per_s']:.1f} | {fs['rtf']:.3f} | - | - | - | - |")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['target']} | error: {r['error']} | | | | | | |")
        else:
            batch = f"{r['batch_frames_per_s']:.0f} at batch {r['batch']}" if "batch" in r else "-"
            ready = f"{r['ready_s']:.1f}" if "ready_s" in r else "-"
            first = f"{r['first_frame_ms']:.1f}" if "first_frame_ms" in r else "-"
            lines.append(f"| {r['format']} | {r['target']} | {r['ms_per_frame']:.2f} | {r['frames_per_s']:.1f} | "
                         f"{r['rtf']:.3f} | {100 * r['read_share']:.0f}% | {batch} | {ready} | {first} |")
    if result.get("codec"):
        lines += ["", f"Codec decode: {result['codec']['x_realtime']:.0f}x real time."]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="s2conv bench", description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="bf16,fp8,q8,q8_0,q4,q4_k,q3,q2",
                    help="comma-separated: every target Linear in one format, or a llama-quantize mix (q4_k_m, "
                    "q5_k_s, ...: the formats `s2conv export --type` picks per layer; q2_k here is the plain format)")
    ap.add_argument("--targets", default="slow,all")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None, help="slow layers (default: S2 Pro's 36)")
    ap.add_argument("--no-codec", action="store_true")
    ap.add_argument("--batch", type=int, default=0, help="also time the batched loop with this many prompts")
    ap.add_argument("--fish-speech", default="eager", help="baseline modes to time: eager, compiled (minutes of "
                    "compilation), both comma-separated, or none")
    ap.add_argument("--results", default=None, help="append a Markdown section with the figures to this file")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_decode.json"))
    args = ap.parse_args(argv)
    fish_modes = [m for m in args.fish_speech.split(",") if m and m != "none"]
    bad = [m for m in fish_modes if m not in ("eager", "compiled")]
    if bad:
        print(f"error: --fish-speech takes eager, compiled or none, not {bad[0]!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: s2conv bench needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}")
    bw = hbm_read_bandwidth()
    print(f"HBM: read-only reduction {bw['read']:.0f} GB/s, device copy {bw['copy']:.0f} GB/s (read+write)")
    cfg = S2Config() if args.layers is None else S2Config().replace(n_layer=args.layers)
    t0 = time.perf_counter()
    model = build_model(cfg)
    print(f"built full-shape model in {time.perf_counter() - t0:.1f} s")
    span = -(-(args.prompt + args.frames) // 256) * 256
    baselines = []
    for mode in fish_modes:
        try:
            fs = time_fish_speech(mode == "compiled", prompt_len=args.prompt)
        except ImportError as e:
            print(f"fish-speech {mode}: skipped ({e}; install the fish-speech package to time the baseline)")
            continue
        baselines.append(fs)
        print(f"fish-speech {mode:8s} {fs['ms_per_frame']:7.2f} ms/frame {fs['frames_per_s']:7.1f} fps "
              f"RTF {fs['rtf']:.3f}  (first call {fs['first_call_s']:.1f} s)")
    rows = []
    for fmt in args.formats.split(","):
        for target in (["slow"] if fmt == "bf16" else args.targets.split(",")):
            undo = [] if fmt == "bf16" else quantize_model(model, fmt, target)
            try:
                kernels = sum(isinstance(m, QuantLinear) and m.kernel is not None for m in model.modules())
                torch.cuda.synchronize()
                t_check = time.perf_counter()
                # what `s2conv.runtime.pipeline.load` does: every kernel of a prefill and a frame compiled at once
                launches = compile_kernels(model, tuple(sorted({*PROMPT_LENGTHS, args.prompt})))
                t_compile = time.perf_counter() - t_check
                check = check_linears(model, target)
                if not check["ok"]:
                    raise RuntimeError(f"kernel output differs from the reference path: relative error "
                                       f"{check['rel_err']:.2e}, max {check['max_rel']:.2e}")
                t_check = time.perf_counter() - t_check
                spf, setup_s = time_decode(model, args.prompt, args.frames)
                first_s = time_first_frame(model, args.prompt)
                gbs = bytes_per_frame(model, span) / spf / 1e9
                row = dict(format=fmt, target=target, ms_per_frame=spf * 1e3, frames_per_s=1 / spf,
                           rtf=FRAME_HZ * spf, gb_per_s=gbs, read_share=gbs / bw["read"], fused_kernels=kernels,
                           check=check, ready_s=t_check + setup_s, compile_s=t_compile, launches_compiled=launches,
                           first_frame_ms=first_s * 1e3,
                           formats=format_counts(model, target))
                if args.batch:
                    row.update(batch=args.batch, batch_frames_per_s=time_decode_batch(
                        model, args.prompt, args.frames, args.batch))
            except Exception as e:  # a format's failure must not hide the others' numbers
                row = dict(format=fmt, target=target, error=f"{type(e).__name__}: {e}")
            finally:
                for parent, attr, lin in undo:
                    setattr(parent, attr, lin)
                torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"{fmt:6s} {target:4s} ERROR {row['error']}")
            else:
                print(f"{fmt:6s} {target:4s} {row['ms_per_frame']:7.2f} ms/frame {row['frames_per_s']:7.1f} fps "
                      f"RTF {row['rtf']:.3f}  {row['gb_per_s']:6.0f} GB/s = {100 * row['read_share']:.0f}% of read "
                      f"bandwidth ({row['fused_kernels']} fused linears; vs reference: "
                      f"{row['check']['rel_err']:.1e} relative error over {row['check']['shapes']} shapes); "
                      f"ready after {row['ready_s']:.1f} s of one-time work (kernel compilation, prefill, graph "
                      f"capture; {row['compile_s']:.1f} s of it compiling ahead); first frame of a "
                      f"{args.prompt}-token prompt after {row['first_frame_ms']:.1f} ms")
                if len(row["formats"]) > 1:
                    print(f"{'':11s} linears: " + ", ".join(f"{n} {f}" for f, n in sorted(row["formats"].items())))
                if "batch" in row:
                    print(f"{'':11s} batch {row['batch']}: {row['batch_frames_per_s']:7.1f} frames/s aggregate "
                          f"({row['batch_frames_per_s'] * row['ms_per_frame'] / 1e3:.2f}x batch 1)")
    codec = None if args.no_codec else time_codec()
    if codec:
        for key in ("default", "cudnn_benchmark", "cuda_graph"):
            c = codec[key]
            print(f"codec decode ({key}): {codec['frames']} frames in {c['seconds'] * 1e3:.1f} ms = "
                  f"{c['x_realtime']:.0f}x real time")
    result = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__, hbm=bw, rows=rows,
                  fish_speech=baselines, codec=codec, prompt=args.prompt, frames=args.frames, layers=cfg.n_layer)
    if args.results:
        append_markdown(args.results, result)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
