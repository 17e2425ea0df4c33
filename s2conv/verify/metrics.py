"""Error metrics of the verifier: pure functions on tensors, each returning a small dataclass.

`compare_tensors` (weights), `compare_logits` (llama.cpp perplexity-tool style KL / top-1 / delta-p figures),
`compare_audio` (waveform SNR, SI-SDR, multi-resolution log-mel distance) and `compare_codes` (greedy synthesis).
Sums are accumulated in float64 so a 400 M-element tensor gives the same figure as a small one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from s2conv.errors import S2ConvError

_ROW_CHUNK_ELEMENTS = 1 << 24  # tensors are compared in row blocks of about 16 M elements


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorError:
    """How far a decoded tensor is from its reference.

    rel_rmse = ||deq - ref|| / ||ref||; snr_db = 10 log10(||ref||^2 / ||deq - ref||^2) (inf when exact);
    cosine of the flattened tensors; max_abs = max |deq - ref|; exact: every element equal (NaN never equal);
    worst_row: index of the row (last dim = columns) with the largest squared error, -1 when exact;
    ref_norm = ||ref|| (pools errors over several tensors).
    """

    numel: int
    ref_norm: float
    rel_rmse: float
    snr_db: float
    cosine: float
    max_abs: float
    exact: bool
    worst_row: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare_tensors(ref: Tensor, deq: Tensor) -> TensorError:
    """Compare `deq` with `ref` (same number of elements, any float dtype; shapes may differ, e.g. [n] vs [1, n])."""
    if ref.numel() != deq.numel():
        raise S2ConvError(f"compare_tensors: {ref.numel()} reference elements vs {deq.numel()} decoded elements")
    cols = ref.shape[-1] if ref.dim() > 0 else 1
    r2d, d2d = ref.reshape(-1, cols), deq.reshape(-1, cols)
    step = max(1, _ROW_CHUNK_ELEMENTS // cols)
    err2 = ref2 = deq2 = dot = 0.0
    max_abs, exact = 0.0, True
    worst_row, worst_row_err = -1, 0.0
    for r0 in range(0, r2d.shape[0], step):
        r = r2d[r0:r0 + step].double()
        d = d2d[r0:r0 + step].double()
        e = d - r
        row_err = e.square().sum(dim=1)
        err2 += float(row_err.sum())
        ref2 += float(r.square().sum())
        deq2 += float(d.square().sum())
        dot += float((r * d).sum())
        if e.numel():
            max_abs = max(max_abs, float(e.abs().max()))
        exact = exact and bool(torch.equal(r, d))
        i = int(row_err.argmax()) if row_err.numel() else 0
        if row_err.numel() and float(row_err[i]) > worst_row_err:
            worst_row, worst_row_err = r0 + i, float(row_err[i])
    finite = math.isfinite(err2) and math.isfinite(ref2)
    if not finite:
        return TensorError(ref.numel(), math.sqrt(ref2), math.inf, -math.inf, math.nan, math.inf, False, worst_row)
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    snr = math.inf if err2 == 0 else (10 * math.log10(ref2 / err2) if ref2 > 0 else -math.inf)
    norm = math.sqrt(ref2 * deq2)
    cosine = dot / norm if norm > 0 else (1.0 if ref2 == deq2 == 0 else 0.0)
    return TensorError(ref.numel(), math.sqrt(ref2), rel, snr, cosine, max_abs, exact, worst_row if not exact else -1)


# ---------------------------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitStats:
    """Distribution change of one head over n positions (reference model P, tested model Q).

    kl_*: KL(P || Q) in nats per position (mean, 99th percentile, max); top1: share of positions with the same
    argmax; dp_abs_mean: mean |Q(t) - P(t)| of the reference token t; dp_rms its RMS; ppl_ratio:
    exp(mean(-log Q(t))) / exp(mean(-log P(t))) (1 = same perplexity on the reference tokens).
    """

    n: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1: float
    dp_abs_mean: float
    dp_rms: float
    ppl_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_logits(ref_logits: Tensor, logits: Tensor, targets: Tensor) -> LogitStats:
    """ref_logits, logits: [N, V] (any float dtype, same shape); targets: [N] int64 reference tokens."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise S2ConvError(f"compare_logits: shapes {tuple(ref_logits.shape)} and {tuple(logits.shape)}, "
                          f"expected two equal [N, V]")
    if targets.shape != (ref_logits.shape[0],):
        raise S2ConvError(f"compare_logits: targets shape {tuple(targets.shape)}, expected ({ref_logits.shape[0]},)")
    n = ref_logits.shape[0]
    if n == 0:
        return LogitStats(0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0)
    logp = F.log_softmax(ref_logits.double(), dim=-1)
    logq = F.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    # 0 * log 0 counts as 0; a token that P allows and Q rules out gives inf, as it should
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=-1).clamp_min(0.0)
    top1 = (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).double().mean()
    t = targets.long()[:, None]
    lp_t, lq_t = logp.gather(1, t)[:, 0], logq.gather(1, t)[:, 0]
    dp = lq_t.exp() - lp_t.exp()
    return LogitStats(
        n=n, kl_mean=float(kl.mean()), kl_p99=float(torch.quantile(kl, 0.99)), kl_max=float(kl.max()),
        top1=float(top1), dp_abs_mean=float(dp.abs().mean()), dp_rms=float(dp.square().mean().sqrt()),
        ppl_ratio=float(torch.exp((lp_t - lq_t).mean())),
    )


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------

MEL_RESOLUTIONS = (512, 1024, 2048)  # n_fft of the multi-resolution log-mel distance (hop = n_fft / 4)
N_MELS = 80
LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class AudioError:
    """Waveform change of a decode (reference wav r, tested wav x, same length).

    snr_db = 10 log10(||r||^2 / ||x - r||^2); si_sdr_db: scale-invariant SDR; mel_distance: mean over
    MEL_RESOLUTIONS of the mean |log mel(x) - log mel(r)| (natural log, floor 1e-5); max_abs: max |x - r|.
    """

    n_samples: int
    snr_db: float
    si_sdr_db: float
    mel_distance: float
    max_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sr: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1] (peak 1), float64."""
    f_max = sr / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))),
                                     n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lo) / (mid - lo)
    falling = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel(wav: Tensor, sr: int, n_fft: int, n_mels: int = N_MELS) -> Tensor:
    """wav [L] -> natural-log mel magnitude spectrogram [n_mels, frames] (Hann window, hop n_fft / 4), float64."""
    x = wav.double().reshape(-1)
    if x.numel() < n_fft:
        x = F.pad(x, (0, n_fft - x.numel()))
    spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft, dtype=torch.float64),
                      center=False, return_complex=True).abs()
    mel = mel_filterbank(n_fft, min(n_mels, n_fft // 8), sr) @ spec
    return torch.log(mel.clamp_min(LOG_FLOOR))


def mel_distance(ref_wav: Tensor, wav: Tensor, sr: int, resolutions=MEL_RESOLUTIONS) -> float:
    """Mean over resolutions of mean |log mel(wav) - log mel(ref_wav)|; 0 for identical waveforms."""
    return float(sum((log_mel(wav, sr, n) - log_mel(ref_wav, sr, n)).abs().mean() for n in resolutions)
                 / len(resolutions))


def compare_audio(ref_wav: Tensor, wav: Tensor, sr: int) -> AudioError:
    """ref_wav, wav: waveforms with the same number of samples (any shape), sample rate sr."""
    if ref_wav.numel() != wav.numel():
        raise S2ConvError(f"compare_audio: {ref_wav.numel()} reference samples vs {wav.numel()} samples")
    r, x = ref_wav.double().reshape(-1), wav.double().reshape(-1)
    if r.numel() == 0:
        return AudioError(0, math.inf, math.inf, 0.0, 0.0)
    e = x - r
    sig, noise = float(r.square().sum()), float(e.square().sum())
    snr = _db(sig, noise)
    # SI-SDR: project x on r, compare the projection with the residual
    alpha = float((x * r).sum()) / sig if sig > 0 else 0.0
    target = alpha * r
    si_sdr = _db(float(target.square().sum()), float((x - target).square().sum()))
    return AudioError(r.numel(), snr, si_sdr, mel_distance(r, x, sr), float(e.abs().max()))


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------------------------------------
# Greedy synthesis
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeMatch:
    """Greedy codes of the tested model vs the reference model (codes [num_codebooks, T] each).

    frame_match: frames equal in every codebook / the longer length; code_match: equal codes / all codes of the
    longer length (missing frames count as mismatches); first_diff: first differing frame (-1: identical).
    """

    ref_frames: int
    frames: int
    frame_match: float
    code_match: float
    first_diff: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare_codes(ref_codes: Tensor, codes: Tensor) -> CodeMatch:
    n_ref, n = ref_codes.shape[1], codes.shape[1]
    longest, common = max(n_ref, n), min(n_ref, n)
    if longest == 0:
        return CodeMatch(0, 0, 1.0, 1.0, -1)
    eq = ref_codes[:, :common].cpu() == codes[:, :common].cpu()  # [N, common]
    frame_eq = eq.all(dim=0)
    diffs = (~frame_eq).nonzero()
    first = int(diffs[0, 0]) if diffs.numel() else (common if n_ref != n else -1)
    return CodeMatch(n_ref, n, float(frame_eq.sum()) / longest, float(eq.sum()) / (longest * ref_codes.shape[0]),
                     first)
