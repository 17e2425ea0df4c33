"""Verification of GGUF exports against their source checkpoint: tensor, model (KL / top-1) and audio levels.

Metric functions (`compare_tensors`, `compare_logits`, `compare_audio`, `compare_codes`) are pure; `verify_gguf`
runs all levels on one file; `THRESHOLDS` holds the per-format error limits.
"""
from s2conv.verify.metrics import compare_audio, compare_codes, compare_logits, compare_tensors
from s2conv.verify.thresholds import THRESHOLDS, Threshold, threshold_for
from s2conv.verify.verifier import (
    ReferenceRun, VerifyFailed, VerifyOptions, VerifyReport, reference_outputs, run_verify, verify_gguf,
)

__all__ = [
    "compare_audio", "compare_codes", "compare_logits", "compare_tensors", "THRESHOLDS", "Threshold",
    "threshold_for", "ReferenceRun", "VerifyFailed", "VerifyOptions", "VerifyReport", "reference_outputs",
    "run_verify", "verify_gguf",
]
