"""Token sampling as fish-speech does it: top-k / top-p / temperature, exponential-race draw, and RAS.

RAS (repetition-aware sampling): every step also draws a "high" sample (temperature 1.0, top-p 0.9); when the
normal sample is a semantic token already among the last `ras_window` main tokens, the high sample replaces it.
All functions are free of host synchronisation so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from s2conv.errors import RuntimeModelError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. temperature 0 or top_k 1 means greedy (argmax, no randomness, RAS off)."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 30
    ras_window: int = 10  # 0 turns RAS off
    ras_temperature: float = 1.0
    ras_top_p: float = 0.9

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # NaN fails every comparison
            raise RuntimeModelError(f"sampling temperature must be finite and >= 0, got {self.temperature}")
        for name in ("top_p", "ras_top_p"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise RuntimeModelError(f"sampling {name} must be in (0, 1], got {value}")
        if not self.ras_temperature > 0:
            raise RuntimeModelError(f"sampling ras_temperature must be > 0, got {self.ras_temperature}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise RuntimeModelError(f"sampling top_k must be an integer >= 1, got {self.top_k}")
        if not _is_int(self.ras_window) or self.ras_window < 0:
            raise RuntimeModelError(f"sampling ras_window must be an integer >= 0, got {self.ras_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def high(self) -> "SamplingParams":
        """The RAS fallback settings (same top_k)."""
        return SamplingParams(self.ras_temperature, self.ras_top_p, self.top_k, 0,
                              self.ras_temperature, self.ras_top_p)


def _is_int(x) -> bool:
    """An integral number (3 or 3.0); not NaN, inf or a string."""
    return isinstance(x, (int, float)) and math.isfinite(x) and int(x) == x


def logits_to_probs(logits: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """fish-speech's filter: probabilities [..., V] in logits' dtype.

    Sort descending; drop rank r if r >= top_k or the cumulative softmax of the *untempered* sorted logits at r
    exceeds top_p; always keep rank 0; then divide by max(temperature, 1e-5) and softmax. temperature and top_p are
    rounded to logits' dtype first, as upstream creates them in the model dtype.
    """
    # rounded on the host: creating device tensors here would copy from the host inside a CUDA-graph capture
    t = _round_to(max(temperature, 1e-5), logits.dtype)
    p = _round_to(top_p, logits.dtype)
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    cum_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    remove = ((cum_probs > p) | (rank >= top_k)) & (rank != 0)
    remove = remove.scatter(-1, sorted_idx, remove)
    logits = torch.where(remove, float("-inf"), logits)
    return torch.softmax(logits / t, dim=-1)


def _round_to(x: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(x, dtype=dtype))


def sample_from_probs(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exponential race: argmax(probs / E) with E ~ Exp(1), i.e. a multinomial draw without a host sync.

    probs: [..., V] -> indices [...] int64. The noise is drawn in fp32 from `generator`.
    """
    noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device).exponential_(generator=generator)
    return torch.argmax(probs.float() / noise, dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           fused: bool | None = None, noise: Tensor | None = None, values: Tensor | None = None) -> Tensor:
    """One token per row of logits [..., V] -> [...] int64; greedy settings take the argmax and use no randomness.
    noise, values: as in `sample_many`."""
    return sample_many(logits, [params], generator, fused, noise, values)[0]


def _uses_kernel(device: torch.device, settings: list[SamplingParams], fused: bool | None):
    """The fused sampling module where `sample_many` takes it for these settings, else None."""
    if fused is None:  # S2CONV_FUSED_SAMPLING=0: the eager filter on CUDA too (benchmark baseline)
        fused = device.type == "cuda" and os.environ.get("S2CONV_FUSED_SAMPLING", "1") != "0"
    kernel = _fused_kernel() if fused else None
    if kernel is None or any(p.greedy for p in settings) or len({p.top_k for p in settings}) > 1 \
            or len(settings) > kernel.MAX_DRAWS:
        return None
    return kernel


def uses_fused(params: SamplingParams, device: torch.device) -> bool:
    """Whether a decode frame with these settings draws through the fused kernel (on CUDA with triton, not greedy),
    which can read its (temperature, top_p) pairs from a device tensor (`sample_many`'s values)."""
    settings = [params, params.high()] if params.ras_window else [params]
    return _uses_kernel(device, settings, None) is not None


def sampling_values(params: SamplingParams) -> Tensor:
    """The (temperature, top_p) pairs of a frame's draws, fp32 [2, 2] on the host: the normal draw, then RAS's high
    one (`sample_many`'s values)."""
    high = params.high()
    return torch.tensor([[params.temperature, params.top_p], [high.temperature, high.top_p]], dtype=torch.float32)


def draw_noise(params: SamplingParams, rows: int, draws: int, device: torch.device,
               generator: torch.Generator | None = None) -> Tensor | None:
    """Exp(1) noise [draws, rows, top_k] for `draws` fused draws of rows with `params`, in one launch (a decode
    frame draws 11 times: one launch instead of 11); None where `sample_many` would not take the fused kernel
    (greedy, CPU, no triton), which then draws its own randomness."""
    if _uses_kernel(device, [params], None) is None:
        return None
    noise = torch.empty(draws, rows, params.top_k, dtype=torch.float32, device=device)
    return noise.exponential_(generator=generator)


def sample_many(logits: Tensor, settings: list[SamplingParams], generator: torch.Generator | None = None,
                fused: bool | None = None, noise: Tensor | None = None,
                values: Tensor | None = None) -> list[Tensor]:
    """One token per row of logits [..., V] for each of `settings` (RAS: the normal and the high draw).

    fused (default: on CUDA when triton is installed): one noise draw and one Triton kernel for all draws
    (`kernels/sampling.py`; torch.topk first for top_k > 64) instead of about 18 launches per draw. Noise is drawn
    only for the top_k candidates, so a seed gives other tokens than the eager path, from the same distribution.
    noise (optional, fused path only): those Exp(1) draws, fp32 [>= len(settings), rows, >= top_k] (`draw_noise`;
    the first len(settings) are used) instead of drawing them here. values (optional, fused path only): fp32
    [>= len(settings), 2] on the logits' device, the draws' (temperature, top_p) pairs, which the kernel reads when
    it runs instead of the settings' (a kept CUDA graph then serves other values; top_k, greedy or not and the
    number of draws still come from the settings). Otherwise each draw runs `logits_to_probs` and
    `sample_from_probs` in turn."""
    kernel = _uses_kernel(logits.device, settings, fused)
    if kernel is None:
        return [torch.argmax(logits, dim=-1) if p.greedy else
                sample_from_probs(logits_to_probs(logits, p.temperature, p.top_p, p.top_k), generator)
                for p in settings]
    return _fused_draws(kernel, logits, settings, generator, noise, values)[0]


def sample_embed(logits: Tensor, params: SamplingParams, table: Tensor, generator: torch.Generator | None = None,
                 fused: bool | None = None, noise: Tensor | None = None,
                 values: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`sample` and the table's rows of the tokens drawn: (tokens [...], rows [..., D]) = (t, F.embedding(t, table)),
    the next decode step's input. The fused kernel copies the rows itself (no gather launch after it)."""
    kernel = _uses_kernel(logits.device, [params], fused)
    if kernel is None:
        tokens = sample(logits, params, generator, fused)
        return tokens, F.embedding(tokens, table)
    (tokens,), rows = _fused_draws(kernel, logits, [params], generator, noise, values, table)
    return tokens, rows.reshape(*logits.shape[:-1], table.shape[1])


def _fused_draws(kernel, logits: Tensor, settings: list[SamplingParams], generator: torch.Generator | None,
                 noise: Tensor | None, values: Tensor | None,
                 table: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
    """`sample_many`'s fused path: (tokens per setting, the table's rows of the first setting's tokens or None)."""
    rows = logits.reshape(-1, logits.shape[-1]).contiguous()
    top_k = settings[0].top_k
    k = min(top_k, rows.shape[-1])
    vals = idx = None
    if not kernel.select_in_kernel(rows.shape[-1], k):
        vals, idx = torch.topk(rows, k, dim=-1)
    if noise is None:
        noise = torch.empty(len(settings), rows.shape[0], k, dtype=torch.float32, device=rows.device)
        noise.exponential_(generator=generator)
    elif noise.dim() != 3 or noise.shape[0] < len(settings) or noise.shape[1] != rows.shape[0] \
            or noise.shape[2] < k:
        raise RuntimeModelError(f"sampling noise must be [>= {len(settings)}, {rows.shape[0]}, >= {k}], "
                                f"got {tuple(noise.shape)}")
    else:
        noise = noise[:len(settings), :, :k]
    if values is not None:
        draws = values[:len(settings)]
    else:
        draws = [(_round_to(max(p.temperature, 1e-5), rows.dtype), _round_to(p.top_p, rows.dtype)) for p in settings]
    out = kernel.topk_sample(rows, vals, idx, noise, draws, top_k, table)
    tokens, embedded = out if table is not None else (out, None)
    return [t.reshape(logits.shape[:-1]) for t in tokens], embedded


def _fused_kernel():
    """kernels/sampling.py, or None without triton."""
    try:
        from s2conv.runtime.kernels import sampling
    except ImportError:
        return None
    return sampling


def ras_select(normal: Tensor, high: Tensor, previous: Tensor, repeatable: Tensor) -> Tensor:
    """Pick the high sample where the normal one repeats: normal, high, repeatable: [B]; previous: [B, W]."""
    in_window = (previous == normal[:, None]).any(dim=-1)
    return torch.where(in_window & repeatable, high, normal)
