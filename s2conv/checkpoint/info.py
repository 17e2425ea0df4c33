"""A summary of a checkpoint for `s2conv info`: parameter counts, dtypes, shapes, codec config, optional value scan."""
from __future__ import annotations

import dataclasses
from collections import Counter

from s2conv.checkpoint.reader import open_checkpoint


def checkpoint_info(path_or_repo_id: str, check: bool = False) -> dict:
    """Open (and validate) a checkpoint; with check=True also scan all values for NaN/Inf (raises on any).

    Returns a JSON-ready dict: path, params per component, model/codec tensor counts and dtypes, the largest
    shapes, the S2 config, the codec config (with hop and frame length), and `values_checked` when check is set.
    """
    ckpt = open_checkpoint(path_or_repo_id)
    names = ckpt.model_names()
    dtypes = Counter(str(ckpt.model_dtype(n)).replace("torch.", "") for n in names)
    codec_dtypes = Counter(str(ckpt.codec_tensor(n).dtype).replace("torch.", "") for n in ckpt.codec_names())
    params = ckpt.n_params()
    info = {
        "path": str(ckpt.path),
        "params": {**params, "model_total": params["slow_ar"] + params["fast_ar"] + params["embeddings"]},
        "model_tensors": len(names),
        "model_dtypes": dict(dtypes),
        "codec_tensors": len(ckpt.codec_names()),
        "codec_dtypes": dict(codec_dtypes),
        "shapes": {n: list(ckpt.model_shape(n)) for n in names if n.startswith(("embeddings", "codebook_emb",
                                                                                   "layers.0.", "fast_output"))},
        "config": dataclasses.asdict(ckpt.config),
        "codec_config": {**dataclasses.asdict(ckpt.codec_config), "hop_length": ckpt.codec_config.hop_length,
                         "frame_length": ckpt.codec_config.frame_length},
    }
    if check:
        info["values_checked"] = ckpt.check_values()
    return info


def format_info(info: dict) -> str:
    """Human-readable text of `checkpoint_info`'s dict."""
    p, c, cc = info["params"], info["config"], info["codec_config"]
    lines = [
        f"checkpoint {info['path']}",
        f"  params: slow_ar {p['slow_ar']:,}  fast_ar {p['fast_ar']:,}  embeddings {p['embeddings']:,}  "
        f"(model {p['model_total']:,})  codec {p['codec']:,}",
        f"  model: {info['model_tensors']} tensors {_dtypes(info['model_dtypes'])}; "
        f"{c['n_layer']} slow layers dim {c['dim']} heads {c['n_head']}/{c['n_local_heads']}x{c['head_dim']} "
        f"ffn {c['intermediate_size']}; {c['n_fast_layer']} fast layers dim {c['fast_dim']}; vocab {c['vocab_size']}, "
        f"codebooks {c['num_codebooks']}x{c['codebook_size']}",
        f"  codec: {info['codec_tensors']} tensors {_dtypes(info['codec_dtypes'])}; encoder {cc['encoder_dim']} "
        f"rates {cc['encoder_rates']}, latent {cc['latent_dim']}, decoder {cc['decoder_dim']} rates "
        f"{cc['decoder_rates']}; VQ 1x{cc['semantic_codebook_size']} + {cc['n_residual_codebooks']}x"
        f"{cc['residual_codebook_size']} dim {cc['codebook_dim']}; frame_length {cc['frame_length']} "
        f"@ {cc['sample_rate']} Hz",
    ]
    lines += [f"  {name}: {shape}" for name, shape in info["shapes"].items()]
    if "values_checked" in info:
        lines.append(f"  values: {info['values_checked']} tensors checked, no NaN/Inf")
    return "\n".join(lines)


def _dtypes(counts: dict) -> str:
    return "(" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + ")"
