"""Synthetic S2 Pro checkpoints with the release's exact file layout, for tests and benchmarks without the weights.

`make_checkpoint("tiny" | "small" | "full", out_dir, seed)` writes config.json, two bf16 safetensors shards plus
their index, tokenizer.json / tokenizer_config.json and an fp32 codec.pth. Weights are deterministic per
(seed, tensor name), heavy-tailed with a few outlier input channels, like trained LLM weights. The model shards are
streamed (one chunk of one tensor in memory), so `full` (4.56 B params) stays far below 4 GB of RSS.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from s2conv.checkpoint.presets import PRESETS, Preset
from s2conv.checkpoint.safetensors_io import write_safetensors
from s2conv.checkpoint.tokenizer_build import write_tokenizer_files
from s2conv.codec_schema import codec_tensor_shapes, is_weight_norm_g
from s2conv.errors import CheckpointError
from s2conv.schema import CodecConfig, S2Config, model_tensor_shapes

log = logging.getLogger(__name__)

# Share of the slow-AR bytes in the first shard (the release: 4.99 GB of 8.06 GB); the rest of the slow AR and all
# audio_decoder.* tensors go to the second shard.
_FIRST_SHARD_SHARE = 0.62
_CHUNK_ELEMENTS = 1 << 22  # generate big tensors in row blocks of about 4 M elements
# Legacy codec buffers left in the release's codec.pth by older code (spec errata 2); the reader must skip them.
_LEGACY_BUFFER_PREFIXES = ("encoder.block.4.block.5", "quantizer.pre_module", "quantizer.post_module")
_LEGACY_POSITIONS = 64


def make_checkpoint(preset: str, out_dir: Path | str, seed: int = 0, progress: bool = False) -> Path:
    """Write a synthetic checkpoint directory and return its path.

    Files: config.json, model-00001-of-00002.safetensors, model-00002-of-00002.safetensors,
    model.safetensors.index.json, tokenizer.json, tokenizer_config.json, codec.pth. Same (preset, seed) gives
    byte-identical files.
    """
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}, expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    # Element-wise ops on these mid-sized tensors run ~10x slower with the intra-op pool on small machines; one
    # thread is also what makes the generation order-independent of the machine. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make(p, Path(out_dir), seed, progress, preset)
    finally:
        torch.set_num_threads(threads)


def _make(p: Preset, out: Path, seed: int, progress: bool, preset: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = p.config
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n", encoding="utf-8")
    write_tokenizer_files(out, p.n_regular_tokens, cfg.codebook_size)
    _write_model_shards(out, cfg, seed, progress)
    _write_codec(out / "codec.pth", p.codec, seed)
    log.info("wrote %s checkpoint to %s", preset, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Weight generation
# ---------------------------------------------------------------------------------------------------------------


def _generator(seed: int, name: str, chunk: int = 0) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _heavy_tailed(shape: tuple[int, ...], g: torch.Generator, std: float) -> torch.Tensor:
    """Gaussian scale mixture z * exp(0.5 u) (u standard normal): kurtosis ~ 3 e^0.5 ~ 8, rescaled to `std`."""
    z = torch.randn(shape, generator=g)
    z.mul_(torch.randn(shape, generator=g).mul_(0.5).exp_())
    return z.mul_(std / math.exp(0.25))


def _kind(name: str) -> str:
    """What a tensor is, from its name: decides its distribution."""
    if name.endswith(".alpha"):
        return "alpha"
    if is_weight_norm_g(name):
        return "wn_g"
    if name.endswith("layer_scale.gamma") or name.endswith(".gamma"):
        return "gamma"
    if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
        return "norm"
    if name.endswith(".bias"):
        return "bias"
    if name.endswith("codebook.weight"):
        return "codebook"
    return "matrix"


def _small_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A whole fp32 tensor (codec tensors and all 1-D tensors)."""
    g = _generator(seed, name)
    kind = _kind(name)
    if kind in ("norm", "alpha", "wn_g"):
        # positive, around 1 with spread (trained RMSNorm weights, snake alphas, weight-norm row norms)
        return torch.randn(shape, generator=g).mul_(0.2).exp_()
    if kind == "gamma":
        return torch.randn(shape, generator=g).mul_(0.5).exp_().mul_(0.05)
    if kind == "bias":
        return torch.randn(shape, generator=g).mul_(0.02)
    if kind == "codebook":
        return torch.randn(shape, generator=g)
    return _matrix_chunk(name, shape, seed, 0, shape[0])


def _outlier_columns(name: str, fan_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A few input channels (0.5 %, at least 1) of much larger magnitude (x4 .. x16), the same for every row."""
    g = _generator(seed, name, -1)
    n = max(1, fan_in // 200)
    cols = torch.randperm(fan_in, generator=g)[:n]
    scale = 4.0 + 12.0 * torch.rand(n, generator=g)
    return cols, scale


def _matrix_chunk(name: str, shape: tuple[int, ...], seed: int, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of a weight matrix / conv kernel, fp32, std ~ fan_in^-0.5 with outlier input channels.

    Row blocks are generated from a generator keyed by the block's first row, so output does not depend on how
    the caller chunks, as long as it chunks at the same `_rows_per_chunk` boundaries (which it always does).
    """
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    rows_shape = (row1 - row0,) + tuple(shape[1:])
    w = _heavy_tailed(rows_shape, _generator(seed, name, row0), fan_in ** -0.5)
    if len(shape) >= 2 and shape[1] > 1:
        cols, scale = _outlier_columns(name, shape[1], seed)
        w[:, cols] *= scale.reshape((-1,) + (1,) * (len(shape) - 2))
    return w


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))


def _model_tensor_chunks(name: str, shape: tuple[int, ...], seed: int):
    """Yield the bf16 rows of one model tensor, a block of rows at a time."""
    if len(shape) == 1:
        yield _small_tensor(name, shape, seed).to(torch.bfloat16)
        return
    step = _rows_per_chunk(shape)
    for r in range(0, shape[0], step):
        yield _matrix_chunk(name, shape, seed, r, min(shape[0], r + step)).to(torch.bfloat16)


def _write_model_shards(out: Path, cfg: S2Config, seed: int, progress: bool) -> None:
    shapes = model_tensor_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values()) * 2
    text_bytes = sum(math.prod(s) * 2 for n, s in shapes.items() if n.startswith("text_model."))
    first, acc = [], 0
    for name, shape in shapes.items():
        if not name.startswith("text_model.") or acc >= _FIRST_SHARD_SHARE * text_bytes:
            break
        first.append(name)
        acc += math.prod(shape) * 2
    shards = [first, [n for n in shapes if n not in set(first)]]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = _progress_bar(total, progress)
    for names, fname in zip(shards, files):
        def produce(name):
            for chunk in _model_tensor_chunks(name, shapes[name], seed):
                bar.update(chunk.numel() * 2)
                yield chunk
        write_safetensors(out / fname, [(n, "BF16", shapes[n]) for n in names], produce)
    bar.close()
    weight_map = {n: files[i] for i, names in enumerate(shards) for n in names}
    index = {"metadata": {"total_parameters": total // 2, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_codec(path: Path, cc: CodecConfig, seed: int) -> None:
    """fp32 weights with the release's mixed weight-norm naming, plus small legacy freqs_cis/causal_mask buffers."""
    sd: dict[str, torch.Tensor] = {}
    for name, shape in codec_tensor_shapes(cc).items():
        sd[name] = _small_tensor(name, shape, seed)
    half = cc.head_dim // 2
    for prefix in _LEGACY_BUFFER_PREFIXES:
        if any(n.startswith(prefix + ".") for n in sd):
            sd[prefix + ".freqs_cis"] = torch.zeros(_LEGACY_POSITIONS, half, 2, dtype=torch.bfloat16)
            sd[prefix + ".causal_mask"] = torch.ones(_LEGACY_POSITIONS, _LEGACY_POSITIONS, dtype=torch.bool).tril()
    torch.save(sd, path)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="model shards")
