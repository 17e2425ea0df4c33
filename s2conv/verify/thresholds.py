"""THRESHOLDS: the error each storage format may show, in one table keyed by format name.

A tensor fails `s2conv verify` when its relative RMSE exceeds its format's `max_rel_rmse`. The limits are about
1.5x the worst tensor each format gives on the synthetic checkpoints (heavy-tailed weights with outlier input
channels, harder than most trained weights), so a broken encoder or a wrong layout fails while a normal file
passes. Float formats that hold the source exactly are checked for bit equality instead (see tensors.py).
Model-level gates (KL, top-1) are not per format: they come from `--max-kl` / `--min-top1`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    max_rel_rmse: float  # ||deq - ref|| / ||ref|| of one tensor


THRESHOLDS: dict[str, Threshold] = {
    # float formats: only the rounding of a wider source (fp32 codec -> f16 / bf16); exact otherwise
    "f32": Threshold(0.0),
    "f16": Threshold(1e-3),
    "bf16": Threshold(6e-3),
    # s2conv's formats (measured worst tensor on synthetic tiny / small: fp8 0.025, q8 0.040, q4 0.236,
    # q3 0.368, q2 0.525; per-row scales suffer from outlier input channels)
    "fp8": Threshold(0.04),
    "q8": Threshold(0.06),
    "q4": Threshold(0.35),
    "q3": Threshold(0.55),
    "q2": Threshold(0.80),
    # ggml block types (measured: q8_0 0.010, q6_k 0.029, q5_k 0.048, q5_0 0.073, q5_1 0.051, q4_k 0.094,
    # q4_0 0.132, q4_1 0.107, q3_k 0.186, q2_k 0.349, tq2_0 0.836)
    "q8_0": Threshold(0.016),
    "q6_k": Threshold(0.045),
    "q5_k": Threshold(0.075),
    "q5_0": Threshold(0.11),
    "q5_1": Threshold(0.08),
    "q4_k": Threshold(0.14),
    "q4_0": Threshold(0.20),
    "q4_1": Threshold(0.16),
    "q3_k": Threshold(0.28),
    "q2_k": Threshold(0.52),
    "tq2_0": Threshold(1.0),
}
UNKNOWN = Threshold(1.0)  # a format without an entry: only gross breakage (error as large as the signal) fails


def threshold_for(fmt: str) -> Threshold:
    return THRESHOLDS.get(fmt, UNKNOWN)
