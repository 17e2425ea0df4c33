"""`s2conv verify`: how far a GGUF file is from its source checkpoint, at tensor, model and audio level.

    report = verify_gguf("model-q4.gguf", "path/to/s2-pro", VerifyOptions(max_kl=0.05))
    print(report.table()); report.check()   # raises VerifyFailed on any failure

The source model's outputs (`reference_outputs`) do not depend on the file, so a caller checking several files
(the experiment runner) computes them once and passes them in.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from s2conv.checkpoint import Checkpoint, load_tokenizer, open_checkpoint
from s2conv.errors import S2ConvError
from s2conv.gguf_io import GGUFFile
from s2conv.runtime.codec import Codec
from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.loader import LoadedModel, load_model
from s2conv.verify import probe
from s2conv.verify.metrics import AudioError, CodeMatch, LogitStats, compare_audio, compare_codes, compare_logits
from s2conv.verify.tensors import CheckpointSource, TensorLevel, compare_file_tensors

log = logging.getLogger(__name__)

LEVELS = ("tensors", "model", "audio")
AUTO_FP32_MAX_PARAMS = 1_000_000_000  # "auto" compute dtype: float32 below this many model parameters, else bf16


class VerifyFailed(S2ConvError):
    """A verified file missed a gate: a lossless tensor differs, an error is above its threshold, or KL/top-1."""


@dataclass(frozen=True)
class VerifyOptions:
    """max_kl / min_top1 gate the mean KL and the top-1 agreement of the semantic head and of the fast heads
    (all codebooks pooled); None = no gate. dtype: compute dtype of both models ("auto", "float32", "bfloat16")."""

    max_kl: float | None = None
    min_top1: float | None = None
    levels: tuple[str, ...] = LEVELS
    probe: probe.ProbeSettings = field(default_factory=probe.ProbeSettings)
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self):
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad:
            raise S2ConvError(f"unknown verify level {bad[0]!r}; expected some of {', '.join(LEVELS)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise S2ConvError(f"verify dtype {self.dtype!r}: expected auto, float32 or bfloat16")
        if self.max_kl is not None and not self.max_kl >= 0:
            raise S2ConvError(f"--max-kl must be >= 0, got {self.max_kl}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise S2ConvError(f"--min-top1 must be in [0, 1], got {self.min_top1}")


@dataclass
class ReferenceRun:
    """The source model's outputs on the probe prompts, reusable for any number of files of that checkpoint."""

    prompts: list[probe.ProbePrompt]
    outputs: probe.ProbeOutputs
    dtype: torch.dtype
    settings: probe.ProbeSettings


@dataclass
class VerifyReport:
    path: Path
    reference: Path
    file_bytes: int
    formats: dict[str, int]  # storage format -> tensor count
    tensors: TensorLevel | None = None
    heads: dict[str, LogitStats] = field(default_factory=dict)  # "semantic", "fast", "cb1".."cb9"
    audio: AudioError | None = None  # all prompts' waveforms concatenated
    greedy: CodeMatch | None = None  # all prompts' greedy codes concatenated
    greedy_frames_per_s: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was written (JSON, plots), shown under the table

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self) -> None:
        """Raise VerifyFailed with a one-line message when any check failed."""
        if self.failures:
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise VerifyFailed(f"{self.path.name}: {self.failures[0]}{more}")

    def to_dict(self) -> dict:
        from s2conv.verify.report import report_to_dict

        return report_to_dict(self)

    def table(self) -> str:
        from s2conv.verify.report import format_report

        return format_report(self)


def compute_dtype(name: str, n_params: int) -> torch.dtype:
    if name == "auto":
        return torch.float32 if n_params < AUTO_FP32_MAX_PARAMS else torch.bfloat16
    return getattr(torch, name)


def reference_outputs(ckpt: Checkpoint, options: VerifyOptions = VerifyOptions()) -> ReferenceRun:
    """Run the source model (from the checkpoint's tensors) and the source codec (weight norm folded here) on the
    probe prompts."""
    dtype = compute_dtype(options.dtype, _model_params(ckpt))
    prompts = probe.build_prompts(load_tokenizer(ckpt.tokenizer_path), ckpt.config, ckpt.codec_config, options.probe)
    out = probe.ProbeOutputs()
    with probe.threads_for(_model_params(ckpt), options.device):
        if "model" in options.levels:
            weights = {n: ckpt.model_tensor(n) for n in ckpt.model_names()}
            model = DualARTransformer.from_weights(ckpt.config, weights, dtype=dtype, device=options.device)
            del weights
            probe.run_model(model, prompts, options.probe.greedy_frames, out)
            del model
        if "audio" in options.levels:
            codec = Codec.from_weights(ckpt.codec_config, CheckpointSource(ckpt).folded_codec(),
                                       dtype=torch.float32, device=options.device)
            probe.run_codec(codec, prompts, out)
            del codec
    return ReferenceRun(prompts, out, dtype, options.probe)


def verify_gguf(path: str | Path, reference: str | Path | Checkpoint, options: VerifyOptions = VerifyOptions(), *,
                ref_run: ReferenceRun | None = None, loaded: LoadedModel | None = None) -> VerifyReport:
    """Verify GGUF file `path` against the checkpoint `reference` (a directory, repo id or opened Checkpoint).

    ref_run: outputs of `reference_outputs(ckpt, options)` to reuse; loaded: the file already loaded with
    `load_model(path, dtype=<compute dtype>, codec_dtype=torch.float32)` (the source codec runs in float32).
    Never raises for a failed check: see `VerifyReport.check`."""
    path = Path(path)
    ckpt = reference if isinstance(reference, Checkpoint) else open_checkpoint(reference)
    gguf = GGUFFile(path)
    report = VerifyReport(path, Path(ckpt.path), path.stat().st_size, _format_counts(gguf))
    report.gates = dict(max_kl=options.max_kl, min_top1=options.min_top1)
    with probe.threads_for(_model_params(ckpt), options.device):
        _run_levels(report, gguf, ckpt, options, ref_run, loaded)
    return report


def _model_params(ckpt: Checkpoint) -> int:
    return sum(v for k, v in ckpt.n_params().items() if k != "codec")


def _run_levels(report: VerifyReport, gguf: GGUFFile, ckpt: Checkpoint, options: VerifyOptions,
                ref_run: ReferenceRun | None, loaded: LoadedModel | None) -> None:
    t0 = time.perf_counter()
    if "tensors" in options.levels:
        report.tensors = compare_file_tensors(gguf, ckpt)
        report.failures += report.tensors.failures()
        report.seconds["tensors"] = time.perf_counter() - t0
    if "model" in options.levels or "audio" in options.levels:
        t1 = time.perf_counter()
        if ref_run is None:
            ref_run = reference_outputs(ckpt, options)
        report.seconds["reference"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        _compare_outputs(report, gguf.path, ckpt, ref_run, options, loaded)
        report.seconds["model_audio"] = time.perf_counter() - t1
    report.failures += _gate_failures(report, options)
    report.seconds["total"] = time.perf_counter() - t0


def _compare_outputs(report: VerifyReport, path: Path, ckpt: Checkpoint, ref: ReferenceRun,
                     options: VerifyOptions, loaded: LoadedModel | None) -> None:
    own = loaded is None
    if own:
        loaded = load_model(path, device=options.device, dtype=ref.dtype, codec_dtype=torch.float32)
    try:
        out = probe.ProbeOutputs()
        if "model" in options.levels:
            probe.run_model(loaded.model, ref.prompts, ref.settings.greedy_frames, out)
            report.heads = _head_stats(ckpt.config, ref, out)
            if ref.outputs.greedy_codes:
                report.greedy = compare_codes(torch.cat(ref.outputs.greedy_codes, dim=1),
                                              torch.cat(out.greedy_codes, dim=1))
                if out.greedy_seconds > 0:
                    report.greedy_frames_per_s = out.greedy_frames / out.greedy_seconds
        if "audio" in options.levels:
            probe.run_codec(loaded.codec, ref.prompts, out)
            report.audio = compare_audio(torch.cat(ref.outputs.waveforms), torch.cat(out.waveforms),
                                         loaded.codec.cc.sample_rate)
    finally:
        if own:
            del loaded


def _head_stats(cfg, ref: ReferenceRun, out: probe.ProbeOutputs) -> dict[str, LogitStats]:
    """Semantic head, all fast codebooks pooled ("fast"), and each fast codebook ("cb1".."cb{N-1}")."""
    sem_t = torch.cat([probe.semantic_targets(cfg, p) for p in ref.prompts])
    heads = {"semantic": compare_logits(torch.cat(ref.outputs.semantic_logits), torch.cat(out.semantic_logits),
                                        sem_t)}
    ref_fast, fast = torch.cat(ref.outputs.fast_logits), torch.cat(out.fast_logits)  # (F, N - 1, K)
    fast_t = torch.cat([probe.fast_targets(p) for p in ref.prompts])  # (F, N - 1)
    k = ref_fast.shape[-1]
    heads["fast"] = compare_logits(ref_fast.reshape(-1, k), fast.reshape(-1, k), fast_t.reshape(-1))
    for cb in range(ref_fast.shape[1]):
        heads[f"cb{cb + 1}"] = compare_logits(ref_fast[:, cb], fast[:, cb], fast_t[:, cb])
    return heads


def _gate_failures(report: VerifyReport, options: VerifyOptions) -> list[str]:
    out = []
    for head in ("semantic", "fast"):
        s = report.heads.get(head)
        if s is None:
            continue
        if options.max_kl is not None and not s.kl_mean <= options.max_kl:
            out.append(f"{head} head mean KL {s.kl_mean:.4g} above --max-kl {options.max_kl:g}")
        if options.min_top1 is not None and not s.top1 >= options.min_top1:
            out.append(f"{head} head top-1 agreement {s.top1:.4f} below --min-top1 {options.min_top1:g}")
    if (options.max_kl is not None or options.min_top1 is not None) and not report.heads:
        out.append("--max-kl / --min-top1 need the model level, which was not run")
    return out


def _format_counts(gguf: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in gguf.tensors:
        fmt = gguf.tensor_format(name).name
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def run_verify(path: str | Path, reference: str | Path, *, json_path: str | Path | None = None,
               plots_dir: str | Path | None = None, max_kl: float | None = None, min_top1: float | None = None,
               frames: int = 32, greedy_frames: int = 32, dtype: str = "auto", device: str = "cpu") -> VerifyReport:
    """The `s2conv verify` job: verify, write the JSON and plots, return the report (its `table()` lists them).

    The caller shows the table, then calls `report.check()` to fail on missed gates."""
    from s2conv.verify.report import write_verify_outputs

    settings = probe.ProbeSettings(frames=frames, greedy_frames=greedy_frames)
    options = VerifyOptions(max_kl=max_kl, min_top1=min_top1, probe=settings, dtype=dtype, device=device)
    report = verify_gguf(path, reference, options)
    report.notes += write_verify_outputs(report, json_path, plots_dir)
    return report

