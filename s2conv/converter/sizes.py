"""`s2conv sizes`: the theoretical file size of every export type and target for the real S2 Pro shapes.

Built from `schema.model_tensor_shapes(S2Config())` and `codec_tensor_shapes(CodecConfig())` through the same
policy and plan code as a real export, so the numbers are what `export` would write (tensor data only; the
metadata adds about 16 MB with the tokenizer).
"""
from __future__ import annotations

from s2conv.codec_schema import codec_tensor_shapes
from s2conv.converter.plan import build_plan, codec_sources, model_sources, summarize
from s2conv.converter.policy import TARGETS, TYPE_CHOICES, ModelDims, Policy
from s2conv.schema import CodecConfig, S2Config, hf_to_model_name, model_tensor_shapes


def size_table(cfg: S2Config | None = None, cc: CodecConfig | None = None, compat: bool = False) -> dict:
    """{"model": {...}, "reference_bf16_bytes": int, "types": {type: {target: summary}}}.

    summary = per component (slow_ar, fast_ar, embeddings, codec, total): tensors, params, bytes, bpw, bf16_bytes,
    vs_bf16. Model tensors are bf16 at the source, the codec fp32 (exported as f16).
    """
    cfg = cfg or S2Config()
    cc = cc or CodecConfig()
    shapes = {hf_to_model_name(n): s for n, s in model_tensor_shapes(cfg).items()}
    codec = codec_tensor_shapes(cc)
    sources = (model_sources(shapes, shapes.__getitem__, lambda n: "bf16")
               + codec_sources(codec, codec.__getitem__, lambda n: "f32"))
    dims = ModelDims.from_config(cfg)
    table = {}
    for t in TYPE_CHOICES:
        table[t] = {}
        for target in TARGETS:
            rows = build_plan(sources, Policy(type=t, target=target, compat=compat, dims=dims))
            table[t][target] = summarize(rows)
    total = table["bf16"]["slow"]["total"]
    return dict(
        model=dict(n_layer=cfg.n_layer, n_fast_layer=cfg.n_fast_layer, dim=cfg.dim, vocab_size=cfg.vocab_size,
                   params=total["params"], tensors=total["tensors"]),
        compat=compat, reference_bf16_bytes=total["bf16_bytes"], types=table,
    )


def format_sizes(table: dict) -> str:
    """One line per type and target: total GB, slow/fast AR bits per weight, size vs bf16."""
    lines = [f"{'type':<8} {'target':<6} {'GB':>7} {'slow bpw':>9} {'fast bpw':>9} {'vs bf16':>8}"]
    for t, by_target in table["types"].items():
        for target, s in by_target.items():
            lines.append(f"{t:<8} {target:<6} {s['total']['bytes'] / 1e9:>7.3f} {s['slow_ar']['bpw']:>9.3f} "
                         f"{s['fast_ar']['bpw']:>9.3f} {100 * s['total']['vs_bf16']:>7.1f}%")
    return "\n".join(lines)
