"""Waveform I/O: reading reference clips (any rate, any channel count) and writing WAV files.

Resampling is a band-limited windowed-sinc polyphase filter (Hann window, 6 zero crossings, roll-off 0.99), the same
filter family as torchaudio's default resampler, which fish-speech uses for reference audio.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from s2conv.errors import RuntimeModelError


def _sinc_kernel(orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """Polyphase filter bank [new, 1, taps] for reduced rates orig -> new, and its half width in input samples."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    # one row per output phase: time of each input tap relative to that output sample, in cutoff periods
    t = (taps[None, :] - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (cutoff / orig))[:, None, :], width


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample the last axis of `wav` (float) from orig_sr to new_sr. Output length ceil(L * new / orig)."""
    if orig_sr == new_sr:
        return wav
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_kernel(orig, new)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1]).to(torch.float64)
    length = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel, stride=orig)  # [n, new, frames]: phase p of frame f is output f*new + p
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, : math.ceil(new * length / orig)]
    return y.reshape(*shape[:-1], -1).to(wav.dtype)


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read an audio file as mono float32 [L] at `sample_rate` (channels averaged, resampled)."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, TypeError)
        raise RuntimeModelError(f"cannot read audio file {str(path)!r}: {e}") from None
    if data.size == 0:
        raise RuntimeModelError(f"audio file {str(path)!r} is empty")
    if not np.isfinite(data).all():
        raise RuntimeModelError(f"audio file {str(path)!r} contains NaN or Inf samples")
    wav = torch.from_numpy(data.mean(axis=1))
    return resample(wav, int(sr), sample_rate)


def save_wav(path: str | Path, wav: torch.Tensor, sample_rate: int) -> None:
    """Write mono float audio as 16-bit PCM WAV, atomically (temp file + rename: no partial file on failure)."""
    import soundfile as sf

    path = Path(path)
    data = wav.detach().float().reshape(-1).clamp(-1, 1).cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise RuntimeModelError(f"cannot write {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
