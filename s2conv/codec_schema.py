"""Tensor names and shapes of the modded-DAC codec (`codec.pth`), and weight-norm folding.

`codec_tensor_shapes` enumerates the module tree of fish-speech's `DAC` (modded_dac.py + rvq.py) in state-dict
order; `codec_config_from_shapes` inverts it, so any codec of the same architecture (S2 Pro or a smaller synthetic
one) is described by its tensor shapes alone, with release names or with weight-norm-folded names.
"""
from __future__ import annotations

import math
import re

import torch

from s2conv.errors import CheckpointError
from s2conv.schema import CodecConfig

# Suffixes of the two weight-norm storages in the release (see spec §5.6):
# new-style `torch.nn.utils.parametrizations.weight_norm` on the 60 causal convs, old-style `weight_g/weight_v`
# on the 20 VQ projections. Folding replaces each (g, v) pair by one plain `weight`.
PARAM_G = ".parametrizations.weight.original0"
PARAM_V = ".parametrizations.weight.original1"
OLD_G = ".weight_g"
OLD_V = ".weight_v"

# Kinds of tensors in one codec transformer layer, in state-dict order.
_TRANSFORMER_KINDS = (
    "attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
    "feed_forward.w2.weight", "ffn_norm.weight", "attention_norm.weight", "attention_layer_scale.gamma",
    "ffn_layer_scale.gamma",
)
ENCODER_TRANSFORMER_HEAD_DIM_DIVISOR = 64  # upstream EncoderBlock: n_head = dim // 64, intermediate = 3 * dim
RESIDUAL_DILATIONS = (1, 3, 9)


def _wn_conv(shapes: dict, prefix: str, weight: tuple[int, ...]) -> None:
    """A causal conv with new-style weight norm: bias [dim0 of the conv output], g [dim0,1,1], v = weight."""
    out_ch = weight[0]
    shapes[prefix + ".conv.bias"] = (out_ch,)
    shapes[prefix + ".conv" + PARAM_G] = (weight[0], 1, 1)
    shapes[prefix + ".conv" + PARAM_V] = weight


def _wn_conv_transpose(shapes: dict, prefix: str, c_in: int, c_out: int, k: int) -> None:
    """ConvTranspose1d weight is [in, out, k]; weight norm dim 0 is then the in-channel, the bias the out-channel."""
    shapes[prefix + ".conv.bias"] = (c_out,)
    shapes[prefix + ".conv" + PARAM_G] = (c_in, 1, 1)
    shapes[prefix + ".conv" + PARAM_V] = (c_in, c_out, k)


def _residual_unit(shapes: dict, prefix: str, c: int) -> None:
    shapes[prefix + ".block.0.alpha"] = (1, c, 1)
    _wn_conv(shapes, prefix + ".block.1", (c, c, 7))
    shapes[prefix + ".block.2.alpha"] = (1, c, 1)
    _wn_conv(shapes, prefix + ".block.3", (c, c, 1))


def _transformer(shapes: dict, prefix: str, n_layer: int, dim: int, attn_dim: int, ffn: int) -> None:
    """Windowed codec transformer: q/k/v of equal width attn_dim (n_local_heads = n_head), SwiGLU of width ffn."""
    kind_shape = {
        "attention.wqkv.weight": (3 * attn_dim, dim), "attention.wo.weight": (dim, attn_dim),
        "feed_forward.w1.weight": (ffn, dim), "feed_forward.w3.weight": (ffn, dim),
        "feed_forward.w2.weight": (dim, ffn),
    }
    for i in range(n_layer):
        for kind in _TRANSFORMER_KINDS:
            shapes[f"{prefix}.layers.{i}.{kind}"] = kind_shape.get(kind, (dim,))
    shapes[prefix + ".norm.weight"] = (dim,)


def _vq(shapes: dict, prefix: str, input_dim: int, codebook_dim: int, codebook_size: int) -> None:
    """dac VectorQuantize: old-style weight-normed 1x1 in/out projections plus the codebook."""
    for proj, (o, i) in (("in_proj", (codebook_dim, input_dim)), ("out_proj", (input_dim, codebook_dim))):
        shapes[f"{prefix}.{proj}.bias"] = (o,)
        shapes[f"{prefix}.{proj}{OLD_G}"] = (o, 1, 1)
        shapes[f"{prefix}.{proj}{OLD_V}"] = (o, i, 1)
    shapes[prefix + ".codebook.weight"] = (codebook_size, codebook_dim)


def _convnext(shapes: dict, prefix: str, c: int) -> None:
    shapes[prefix + ".dwconv.conv.weight"] = (c, 1, 7)
    shapes[prefix + ".dwconv.conv.bias"] = (c,)
    shapes[prefix + ".norm.weight"] = (c,)
    shapes[prefix + ".norm.bias"] = (c,)
    shapes[prefix + ".pwconv1.weight"] = (4 * c, c)
    shapes[prefix + ".pwconv1.bias"] = (4 * c,)
    shapes[prefix + ".pwconv2.weight"] = (c, 4 * c)
    shapes[prefix + ".pwconv2.bias"] = (c,)
    shapes[prefix + ".gamma"] = (c,)


def codec_tensor_shapes(cc: CodecConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of `codec.pth` (release naming, no `generator.` prefix) -> PyTorch shape, in state-dict order.

    535 tensors / 391,430,530 parameters for `CodecConfig()`. Order: encoder, quantizer (semantic VQ, residual VQs,
    downsample, upsample, pre_module, post_module), decoder.
    """
    s: dict[str, tuple[int, ...]] = {}
    # Encoder: conv 1 -> encoder_dim, then blocks that double the channels while striding.
    _wn_conv(s, "encoder.block.0", (cc.encoder_dim, 1, 7))
    c = cc.encoder_dim
    n_t = _pad_layers(cc.encoder_transformer_layers, len(cc.encoder_rates))
    for b, stride in enumerate(cc.encoder_rates, start=1):
        half, c = c, 2 * c
        p = f"encoder.block.{b}.block"
        for r in range(len(RESIDUAL_DILATIONS)):
            _residual_unit(s, f"{p}.{r}", half)
        s[f"{p}.3.alpha"] = (1, half, 1)
        _wn_conv(s, f"{p}.4", (c, half, 2 * stride))
        if n_t[b - 1]:
            heads = c // ENCODER_TRANSFORMER_HEAD_DIM_DIVISOR
            _transformer(s, f"{p}.5", n_t[b - 1], c, heads * cc.head_dim, 3 * c)
    nb = len(cc.encoder_rates)
    s[f"encoder.block.{nb + 1}.alpha"] = (1, c, 1)
    _wn_conv(s, f"encoder.block.{nb + 2}", (cc.latent_dim, c, 3))

    # Quantizer (DownsampleResidualVectorQuantize with downsample_dims = input_dim everywhere).
    d = cc.latent_dim
    _vq(s, "quantizer.semantic_quantizer.quantizers.0", d, cc.codebook_dim, cc.semantic_codebook_size)
    for k in range(cc.n_residual_codebooks):
        _vq(s, f"quantizer.quantizer.quantizers.{k}", d, cc.codebook_dim, cc.residual_codebook_size)
    for direction in ("downsample", "upsample"):
        # upsample is built in reversed factor order; with equal dims only the kernel sizes show it.
        factors = cc.downsample_factor if direction == "downsample" else tuple(reversed(cc.downsample_factor))
        for i, f in enumerate(factors):
            s[f"quantizer.{direction}.{i}.0.conv.weight"] = (d, d, f)
            s[f"quantizer.{direction}.{i}.0.conv.bias"] = (d,)
            _convnext(s, f"quantizer.{direction}.{i}.1", d)
    for module in ("pre_module", "post_module"):
        _transformer(s, f"quantizer.{module}", cc.rvq_n_layer, d, cc.n_head * cc.head_dim, cc.intermediate_size)

    # Decoder: conv latent -> decoder_dim, then blocks that halve the channels while upsampling.
    _wn_conv(s, "decoder.model.0", (cc.decoder_dim, d, 7))
    for i, stride in enumerate(cc.decoder_rates, start=1):
        c_in, c_out = cc.decoder_dim // 2 ** (i - 1), cc.decoder_dim // 2 ** i
        p = f"decoder.model.{i}.block"
        s[f"{p}.0.alpha"] = (1, c_in, 1)
        _wn_conv_transpose(s, f"{p}.1", c_in, c_out, 2 * stride)
        for r in range(len(RESIDUAL_DILATIONS)):
            _residual_unit(s, f"{p}.{r + 2}", c_out)
    nd = len(cc.decoder_rates)
    c_last = cc.decoder_dim // 2 ** nd
    s[f"decoder.model.{nd + 1}.alpha"] = (1, c_last, 1)
    _wn_conv(s, f"decoder.model.{nd + 2}", (1, c_last, 7))
    return s


def _pad_layers(layers: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(layers[:n]) + (0,) * max(0, n - len(layers))


# ---------------------------------------------------------------------------------------------------------------
# Weight-norm folding
# ---------------------------------------------------------------------------------------------------------------


def fold_weight_norm_name(name: str) -> str:
    """Release name -> folded name: both halves of a weight-norm pair map to the plain weight, others unchanged.

    `X.conv.parametrizations.weight.original0|1` -> `X.conv.weight`; `X.weight_g|weight_v` -> `X.weight`.
    """
    for g, v, plain in ((PARAM_G, PARAM_V, ".weight"), (OLD_G, OLD_V, ".weight")):
        for suffix in (g, v):
            if name.endswith(suffix):
                return name[: -len(suffix)] + plain
    return name


def is_weight_norm_g(name: str) -> bool:
    return name.endswith(PARAM_G) or name.endswith(OLD_G)


def is_weight_norm_v(name: str) -> bool:
    return name.endswith(PARAM_V) or name.endswith(OLD_V)


def weight_norm_pairs(names) -> dict[str, tuple[str, str]]:
    """Folded weight name -> (g name, v name) for every weight-norm pair among release `names`."""
    names = set(names)
    pairs = {}
    for v in sorted(n for n in names if is_weight_norm_v(n)):
        g = v[: -len(PARAM_V)] + PARAM_G if v.endswith(PARAM_V) else v[: -len(OLD_V)] + OLD_G
        if g in names:
            pairs[fold_weight_norm_name(v)] = (g, v)
    return pairs


def is_transposed_conv(name: str) -> bool:
    """True for the decoder's ConvTranspose1d weights (`decoder.model.{i}.block.1.conv...`), stored [in, out, k]."""
    return re.match(r"^decoder\.model\.\d+\.block\.1\.conv\.", name) is not None


def folded_codec_tensor_shapes(cc: CodecConfig) -> dict[str, tuple[int, ...]]:
    """`codec_tensor_shapes` with weight norm folded: 535 -> 455 names for S2 Pro (80 g tensors disappear)."""
    return {fold_weight_norm_name(n): s for n, s in codec_tensor_shapes(cc).items() if not is_weight_norm_g(n)}


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """W = g * v / ||v||, the norm over all dims but 0, computed in fp32 (no epsilon, as PyTorch).

    g: [dim0, 1, 1]; v: [dim0, ...] (Conv1d [out, in, k], ConvTranspose1d [in, out, k]: weight norm dim 0 is the
    in-channel there, which is what `transposed` documents; the formula is the same). Returns fp32, v's shape.
    """
    if g.shape[0] != v.shape[0] or g.numel() != v.shape[0]:
        kind = "ConvTranspose1d in-channel" if transposed else "dim-0"
        raise CheckpointError(f"weight norm: g shape {tuple(g.shape)} does not match v shape {tuple(v.shape)} ({kind})")
    v32 = v.float()
    norm = v32.reshape(v32.shape[0], -1).norm(dim=1)
    scale = g.float().reshape(-1) / norm
    return v32 * scale.reshape((-1,) + (1,) * (v32.dim() - 1))


# ---------------------------------------------------------------------------------------------------------------
# Inverse: hyper-parameters from shapes
# ---------------------------------------------------------------------------------------------------------------


def codec_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> CodecConfig:
    """Derive a CodecConfig from codec tensor shapes (release or weight-norm-folded names, no `generator.`).

    Derived: encoder/decoder dims and rates, latent dim, encoder transformer layer counts, codebook sizes and dim,
    number of residual codebooks, downsample factors, pre/post transformer layers, heads (q width / head_dim) and
    FFN width. Not derivable (kept at S2 defaults): sample rate, windows, rope base, eps, head_dim.
    Raises CheckpointError naming the first tensor needed but absent.
    """
    d = CodecConfig()

    def weight(prefix: str) -> tuple[int, ...]:
        # a conv weight under any of its three namings
        for suffix in (PARAM_V, OLD_V, ".weight"):
            if prefix + suffix in shapes:
                return tuple(shapes[prefix + suffix])
        raise CheckpointError(f"codec: no weight for {prefix!r} (expected {prefix}{PARAM_V} or {prefix}.weight)")

    def plain(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"codec: missing tensor {name!r}")
        return tuple(shapes[name])

    def top(pattern: str) -> int:
        # the largest index seen under any suffix (-1 if none), so one missing tensor does not hide its block
        rx = re.compile(pattern)
        return max((int(m.group(1)) for n in shapes if (m := rx.match(n))), default=-1)

    def count(pattern: str) -> int:
        return top(pattern) + 1

    try:
        encoder_dim = weight("encoder.block.0.conv")[0]
        n_enc = max(0, top(r"^encoder\.block\.(\d+)\.block\.4\."))  # blocks 1..n
        enc_rates = tuple(weight(f"encoder.block.{b}.block.4.conv")[2] // 2 for b in range(1, n_enc + 1))
        enc_t = tuple(count(rf"^encoder\.block\.{b}\.block\.5\.layers\.(\d+)\.") for b in range(1, n_enc + 1))
        latent_dim = weight(f"encoder.block.{n_enc + 2}.conv")[0]
        decoder_dim = weight("decoder.model.0.conv")[0]
        n_dec = max(0, top(r"^decoder\.model\.(\d+)\.block\.1\."))  # blocks 1..n
        dec_rates = tuple(weight(f"decoder.model.{i}.block.1.conv")[2] // 2 for i in range(1, n_dec + 1))
        sem = plain("quantizer.semantic_quantizer.quantizers.0.codebook.weight")
        n_res = count(r"^quantizer\.quantizer\.quantizers\.(\d+)\.")
        res = plain("quantizer.quantizer.quantizers.0.codebook.weight") if n_res else (d.residual_codebook_size,)
        n_down = count(r"^quantizer\.downsample\.(\d+)\.")
        down = tuple(plain(f"quantizer.downsample.{i}.0.conv.weight")[2] for i in range(n_down))
        rvq_layers = count(r"^quantizer\.pre_module\.layers\.(\d+)\.")
        if rvq_layers:
            qkv = plain("quantizer.pre_module.layers.0.attention.wqkv.weight")[0]
            n_head = qkv // 3 // d.head_dim
            ffn = plain("quantizer.pre_module.layers.0.feed_forward.w1.weight")[0]
        else:
            n_head, ffn = d.n_head, d.intermediate_size
    except IndexError:
        raise CheckpointError("codec: a convolution weight has too few dimensions") from None
    return d.replace(
        encoder_dim=encoder_dim, encoder_rates=enc_rates, decoder_dim=decoder_dim, decoder_rates=dec_rates,
        latent_dim=latent_dim, encoder_transformer_layers=enc_t, codebook_dim=sem[1], semantic_codebook_size=sem[0],
        n_residual_codebooks=n_res, residual_codebook_size=res[0], downsample_factor=down, rvq_n_layer=rvq_layers,
        n_head=n_head, intermediate_size=ffn,
    )


def codec_n_params(cc: CodecConfig) -> int:
    return sum(math.prod(s) for s in codec_tensor_shapes(cc).values())
