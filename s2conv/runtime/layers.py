"""Transformer building blocks shared by the dual-AR model and the codec: norms, SwiGLU, attention, KV cache.

Linear layers are plain `nn.Linear(bias=False)` attributes named like the checkpoint (wqkv, wo, w1, w2, w3) so a
loader can swap them for quantized modules and `state_dict()` keys equal the GGUF tensor names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.runtime.rope import apply_rotary_emb


class RMSNorm(nn.Module):
    """fish-speech's RMSNorm: normalise in fp32, round to the input dtype, then scale by the weight in that dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class HeadRMSNorm(RMSNorm):
    """QK-norm over head_dim with `torch.nn.RMSNorm` rounding: normalise and scale in fp32, round once (ERRATA 3)."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache(nn.Module):
    """Preallocated keys/values [B, n_kv_heads, max_seq, head_dim]; writes in place, never grows."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H_kv, S, D] at positions input_pos [S]; return cache views [B, H_kv, kv_len, D]."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len]


class Attention(nn.Module):
    """Grouped-query attention with fused wqkv, optional per-head QK-norm (before RoPE) and optional KV cache.

    `explicit_softmax` selects the fast AR's hand-written `softmax(q k^T / sqrt(d) + mask) v` in the model dtype;
    otherwise `F.scaled_dot_product_attention` is used (slow AR and codec, as upstream).
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, qk_norm: bool = False,
                 norm_eps: float = 1e-6, explicit_softmax: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = HeadRMSNorm(head_dim, norm_eps)
            self.k_norm = HeadRMSNorm(head_dim, norm_eps)
        self.qk_norm = qk_norm
        self.explicit_softmax = explicit_softmax
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """x: [B, S, dim]; freqs_cis: [S, D/2, 2] (or [B, S, D/2, 2], per batch row); mask: bool [S, K] (or
        [B, 1, S, K]; True = attend) where K is the number of keys: S without a cache, else the cache prefix length;
        input_pos: [S] cache positions."""
        b, s, _ = x.shape
        q, k, v = self._heads(x, freqs_cis)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, mask.shape[-1])
        groups = self.n_head // self.n_kv_head  # query head h reads KV head h // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if self.explicit_softmax:
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.n_head * self.head_dim))

    def fill_cache(self, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> None:
        """Only write the keys and values of x [B, S, dim] at input_pos [S] into the KV cache (for a position whose
        attention output nobody reads): the wqkv projection, k-norm and RoPE, no attention and no wo."""
        _, k, v = self._heads(x, freqs_cis)
        self.kv_cache.update(input_pos, k, v, 0)

    def _heads(self, x: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, D], k and v [B, H_kv, S, D] of x [B, S, dim]: wqkv, QK-norm, RoPE."""
        b, s, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.n_head, self.head_dim)
        k = k.view(b, s, self.n_kv_head, self.head_dim)
        v = v.view(b, s, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        return tuple(t.transpose(1, 2) for t in (q, k, v))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(attention_norm(x)); out = h + ffn(ffn_norm(h))."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, hidden: int, norm_eps: float,
                 qk_norm: bool = False, explicit_softmax: bool = False):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, head_dim, qk_norm, norm_eps, explicit_softmax)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def fill_cache(self, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> None:
        """Write only this block's keys and values of x at input_pos into its KV cache; the block's output (the
        attention, wo, the feed-forward) is not computed."""
        self.attention.fill_cache(self.attention_norm(x), freqs_cis, input_pos)


def causal_mask(input_pos: Tensor, n_keys: int) -> Tensor:
    """bool [S, n_keys]: query at cache position input_pos[s] may read key position j iff j <= input_pos[s]."""
    keys = torch.arange(n_keys, device=input_pos.device)
    return keys[None, :] <= input_pos[:, None]


def window_mask(n: int, window: int, device=None) -> Tensor:
    """bool [n, n]: query i may read key j iff i - window < j <= i (causal sliding window)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & (j > i - window)
