"""Float64 reference of the S2 Pro math, written from the spec formulas (s2-model.md sections 3 and 5).

Deliberately plain and independent of s2conv.runtime: functions over a weight dict, explicit loops over heads and
blocks, explicit padding + F.conv1d, explicit softmax. Only the RoPE table follows the errata recipe (fp32 -> bf16),
because that rounding is part of the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

f64 = torch.float64


def rope_table(n: int, head_dim: int, base: float) -> torch.Tensor:
    """[n, head_dim/2, 2] (cos, sin), errata recipe, returned in float64."""
    f = 1.0 / (float(base) ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    ang = torch.outer(torch.arange(n).float(), f)
    c = torch.polar(torch.ones_like(ang), ang)
    return torch.stack([c.real, c.imag], -1).to(torch.bfloat16).to(f64)


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, table):
    """x [T, H, D]; rotate pairs (2j, 2j+1) by table [T, D/2, 2]."""
    out = torch.empty_like(x)
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def attention(x, W, p, n_head, n_kv, hd, table, allowed, qk_eps=None):
    """x [T, dim]; allowed [T, T] bool (query, key)."""
    t = x.shape[0]
    qkv = x @ W[p + "wqkv.weight"].T
    q = qkv[:, : n_head * hd].reshape(t, n_head, hd)
    k = qkv[:, n_head * hd: (n_head + n_kv) * hd].reshape(t, n_kv, hd)
    v = qkv[:, (n_head + n_kv) * hd:].reshape(t, n_kv, hd)
    if qk_eps is not None:
        q = rms_norm(q, W[p + "q_norm.weight"], qk_eps)
        k = rms_norm(k, W[p + "k_norm.weight"], qk_eps)
    q, k = rope(q, table), rope(k, table)
    heads = []
    for h in range(n_head):
        kv = h // (n_head // n_kv)
        s = q[:, h] @ k[:, kv].T / math.sqrt(hd)
        s = s.masked_fill(~allowed, float("-inf"))
        pr = torch.exp(s - s.max(-1, keepdim=True).values)
        pr = pr / pr.sum(-1, keepdim=True)
        heads.append(pr @ v[:, kv])
    return torch.cat(heads, -1) @ W[p + "wo.weight"].T


def swiglu(x, W, p):
    return (F.silu(x @ W[p + "w1.weight"].T) * (x @ W[p + "w3.weight"].T)) @ W[p + "w2.weight"].T


def block(x, W, p, n_head, n_kv, hd, eps, table, allowed, qk_norm):
    h = x + attention(rms_norm(x, W[p + "attention_norm.weight"], eps), W, p + "attention.", n_head, n_kv, hd,
                      table, allowed, eps if qk_norm else None)
    return h + swiglu(rms_norm(h, W[p + "ffn_norm.weight"], eps), W, p + "feed_forward.")


# ------------------------------------------------------------------------------------------- dual AR


def slow_forward(cfg, W, tokens):
    """tokens [1 + N, T] -> (final-normed hidden [T, dim], logits [T, vocab])."""
    W = {k: v.to(f64) for k, v in W.items()}
    t = tokens.shape[1]
    x = torch.zeros(t, cfg.dim, dtype=f64)
    for i in range(t):
        tok = int(tokens[0, i])
        e = W["embeddings.weight"][tok].clone()
        if cfg.semantic_begin_id <= tok <= cfg.semantic_end_id:
            for cb in range(cfg.num_codebooks):
                e += W["codebook_embeddings.weight"][int(tokens[cb + 1, i]) + cfg.codebook_size * cb]
            e /= math.sqrt(cfg.num_codebooks + 1)
        x[i] = e
    table = rope_table(t, cfg.head_dim, cfg.rope_base)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    for li in range(cfg.n_layer):
        x = block(x, W, f"layers.{li}.", cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.norm_eps, table, allowed,
                  cfg.attention_qk_norm)
    h = rms_norm(x, W["norm.weight"], cfg.norm_eps)
    return h, h @ W["embeddings.weight"].T


def fast_forward(cfg, W, hidden, codes):
    """Teacher-forced fast AR: inputs [hidden, emb(codes[0]), ..., emb(codes[-1])] at depth positions 0..n;
    returns logits [1 + len(codes), codebook_size]; row k predicts codebook k."""
    W = {k: v.to(f64) for k, v in W.items()}
    x = torch.stack([hidden.to(f64)] + [W["fast_embeddings.weight"][int(c)] for c in codes])
    t = x.shape[0]
    table = rope_table(t, cfg.fast_head_dim, cfg.rope_base)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    for li in range(cfg.n_fast_layer):
        x = block(x, W, f"fast_layers.{li}.", cfg.fast_n_head, cfg.fast_n_local_heads, cfg.fast_head_dim,
                  cfg.norm_eps, table, allowed, cfg.fast_attention_qk_norm)
    return rms_norm(x, W["fast_norm.weight"], cfg.norm_eps) @ W["fast_output.weight"].T


# ------------------------------------------------------------------------------------------- codec


def causal_conv(x, W, p, stride=1, dilation=1, groups=1):
    """x [C, L]: left pad K - stride, right pad to whole strides; output length ceil(L / stride)."""
    w, b = W[p + "weight"], W[p + "bias"]
    span = (w.shape[-1] - 1) * dilation + 1
    length = x.shape[-1]
    n_out = -(-length // stride)
    left = span - stride
    right = (n_out - 1) * stride + span - (length + left)
    xp = torch.cat([x.new_zeros(x.shape[0], left), x, x.new_zeros(x.shape[0], max(right, 0))], -1)
    return F.conv1d(xp[None], w, b, stride=stride, dilation=dilation, groups=groups)[0]


def causal_conv_transpose(x, W, p, stride):
    w, b = W[p + "weight"], W[p + "bias"]
    y = F.conv_transpose1d(x[None], w, b, stride=stride)[0]
    return y[:, : x.shape[-1] * stride]


def snake(x, alpha):
    a = alpha.reshape(-1, 1)
    return x + torch.sin(a * x) ** 2 / (a + 1e-9)


def residual_unit(x, W, p, dilation):
    y = causal_conv(snake(x, W[p + "block.0.alpha"]), W, p + "block.1.conv.", dilation=dilation)
    y = causal_conv(snake(y, W[p + "block.2.alpha"]), W, p + "block.3.conv.")
    return x + y


def convnext(x, W, p):
    y = causal_conv(x, W, p + "dwconv.conv.", groups=x.shape[0]).T  # [L, C]
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + 1e-6) * W[p + "norm.weight"] + W[p + "norm.bias"]
    y = y @ W[p + "pwconv1.weight"].T + W[p + "pwconv1.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    y = y @ W[p + "pwconv2.weight"].T + W[p + "pwconv2.bias"]
    return x + (W[p + "gamma"] * y).T


def window_transformer(x, W, p, cc, window):
    """x [C, T] -> [C, T]; layers counted from the weight names."""
    x = x.T
    t, dim = x.shape
    n_head, hd = dim // cc.head_dim, cc.head_dim
    table = rope_table(t, hd, cc.rope_base)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (j >= i - window + 1)
    li = 0
    while f"{p}layers.{li}.attention.wqkv.weight" in W:
        q = f"{p}layers.{li}."
        n = rms_norm(x, W[q + "attention_norm.weight"], cc.norm_eps)
        h = x + W[q + "attention_layer_scale.gamma"] * attention(n, W, q + "attention.", n_head, n_head, hd, table,
                                                                  allowed)
        x = h + W[q + "ffn_layer_scale.gamma"] * swiglu(rms_norm(h, W[q + "ffn_norm.weight"], cc.norm_eps), W,
                                                         q + "feed_forward.")
        li += 1
    return rms_norm(x, W[p + "norm.weight"], cc.norm_eps).T


def codec_decode(cc, W, codes):
    """codes [10, T] -> waveform [T * frame_length] (float64)."""
    W = {k: v.to(f64) for k, v in W.items()}
    z = 0
    for i in range(cc.n_codebooks):
        if i == 0:
            p, c = "quantizer.semantic_quantizer.quantizers.0.", codes[0].clamp(max=cc.semantic_codebook_size - 1)
        else:
            p, c = f"quantizer.quantizer.quantizers.{i - 1}.", codes[i].clamp(max=cc.residual_codebook_size - 1)
        vec = W[p + "codebook.weight"][c].T  # [d, T]
        z = z + W[p + "out_proj.weight"][:, :, 0] @ vec + W[p + "out_proj.bias"][:, None]
    z = window_transformer(z, W, "quantizer.post_module.", cc, cc.rvq_window)
    for i, f in enumerate(reversed(cc.downsample_factor)):
        z = causal_conv_transpose(z, W, f"quantizer.upsample.{i}.0.conv.", f)
        z = convnext(z, W, f"quantizer.upsample.{i}.1.")
    x = causal_conv(z, W, "decoder.model.0.conv.")
    for i, s in enumerate(cc.decoder_rates):
        p = f"decoder.model.{i + 1}.block."
        x = causal_conv_transpose(snake(x, W[p + "0.alpha"]), W, p + "1.conv.", s)
        for r, d in enumerate((1, 3, 9)):
            x = residual_unit(x, W, f"{p}{r + 2}.", d)
    n = len(cc.decoder_rates)
    x = causal_conv(snake(x, W[f"decoder.model.{n + 1}.alpha"]), W, f"decoder.model.{n + 2}.conv.")
    return torch.tanh(x[0])


def vq_nearest(z, W, p):
    """z [D, T] -> codes [T] by cosine nearest neighbour, and the out-projected code vectors [D, T]."""
    e = W[p + "in_proj.weight"][:, :, 0] @ z + W[p + "in_proj.bias"][:, None]  # [d, T]
    e = e / e.norm(dim=0, keepdim=True).clamp_min(1e-12)
    book = W[p + "codebook.weight"]
    book_n = book / book.norm(dim=1, keepdim=True).clamp_min(1e-12)
    codes = torch.cdist(e.T, book_n).argmin(-1)
    zq = W[p + "out_proj.weight"][:, :, 0] @ book[codes].T + W[p + "out_proj.bias"][:, None]
    return codes, zq


def codec_encode(cc, W, wav):
    """wav [L] -> codes [10, ceil(L / frame_length)]."""
    W = {k: v.to(f64) for k, v in W.items()}
    fl = cc.frame_length
    x = torch.cat([wav.to(f64), wav.new_zeros(-wav.shape[0] % fl).to(f64)])[None]
    x = causal_conv(x, W, "encoder.block.0.conv.")
    for b, s in enumerate(cc.encoder_rates):
        p = f"encoder.block.{b + 1}.block."
        for r, d in enumerate((1, 3, 9)):
            x = residual_unit(x, W, f"{p}{r}.", d)
        x = causal_conv(snake(x, W[p + "3.alpha"]), W, p + "4.conv.", stride=s)
        if f"{p}5.norm.weight" in W:
            x = window_transformer(x, W, p + "5.", cc, cc.encoder_transformer_window)
    n = len(cc.encoder_rates)
    x = causal_conv(snake(x, W[f"encoder.block.{n + 1}.alpha"]), W, f"encoder.block.{n + 2}.conv.")
    for i, f in enumerate(cc.downsample_factor):
        x = causal_conv(x, W, f"quantizer.downsample.{i}.0.conv.", stride=f)
        x = convnext(x, W, f"quantizer.downsample.{i}.1.")
    x = window_transformer(x, W, "quantizer.pre_module.", cc, cc.rvq_window)
    codes, zs = vq_nearest(x, W, "quantizer.semantic_quantizer.quantizers.0.")
    out, r = [codes], x - zs
    for i in range(cc.n_residual_codebooks):
        c, zq = vq_nearest(r, W, f"quantizer.quantizer.quantizers.{i}.")
        out.append(c)
        r = r - zq
    return torch.stack(out)
