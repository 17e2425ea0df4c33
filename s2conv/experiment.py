"""`s2conv experiment`: export, verify and listen to every quantization phase of one checkpoint, side by side.

    OUTDIR/reference/model.gguf     bf16 export (the unquantized baseline) + reference.wav, the voice-cloning clip
    OUTDIR/phase1a/model.gguf       one directory per phase (or `--type` entry), with result.json and verify.json
    OUTDIR/samples/{name}_tts.wav   plain TTS and voice cloning from reference.wav, per phase
    OUTDIR/all_results.json, size_analysis.json, summary.md, plots/

A phase whose result.json says "ok" is skipped on the next run (unless force); a failing phase is recorded with its
error and the others go on.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from s2conv.checkpoint import Checkpoint, open_checkpoint
from s2conv.converter import Policy, export_gguf
from s2conv.converter.policy import PHASES
from s2conv.errors import S2ConvError
from s2conv.runtime.audio import save_wav
from s2conv.runtime.loader import load_model
from s2conv.runtime.pipeline import TTS
from s2conv.runtime.sampling import SamplingParams
from s2conv.verify import VerifyOptions, reference_outputs, verify_gguf
from s2conv.verify.probe import SINGLE_THREAD_MAX_PARAMS, threads_for
from s2conv.verify.report import jsonable, plot_layer_heatmap, plot_size_vs_error, write_json

log = logging.getLogger(__name__)

PHASE_ORDER = tuple(PHASES)  # 1a 1b 2a 2b 2c 3a 3b
REFERENCE_TEXT = ("Good morning. I want to tell you something about the universe. Every atom in your body came "
                  "from a star that exploded. We are all made of star stuff.")
TTS_TEXT = "The weather today is sunny with a light breeze, perfect for a walk in the park."
CLONE_TEXT = "Hello! This sentence is spoken in the voice of the reference recording."
LICENSE_FILES = ("LICENSE.md", "LICENSE", "LICENSE.txt")


@dataclass(frozen=True)
class Entry:
    """One exported variant: a phase ("1a") or a `--type` comparison ("q4_k_m-slow")."""

    name: str
    type: str
    target: str
    is_phase: bool

    @property
    def dirname(self) -> str:
        return f"phase{self.name}" if self.is_phase else f"type-{self.name}"

    def policy(self) -> Policy:
        return Policy.from_options(phase=self.name) if self.is_phase else \
            Policy.from_options(type=self.type, target=self.target)


@dataclass(frozen=True)
class ExperimentSettings:
    """Synthesis: fixed-seed sampling (temperature 0 = greedy) with at most max_frames frames per sample
    (None: 48 for small synthetic models, 1024 otherwise). verify: the options of every verify run."""

    max_frames: int | None = None
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 30
    device: str = "cpu"
    verify: VerifyOptions = field(default_factory=VerifyOptions)

    def frames_for(self, n_params: int) -> int:
        if self.max_frames is not None:
            return self.max_frames
        return 48 if n_params < SINGLE_THREAD_MAX_PARAMS else 1024

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def parse_entries(phases: tuple[str, ...] | list[str], types: tuple[str, ...] | list[str] = ()) -> list[Entry]:
    """`phases`: names from PHASE_ORDER or "all"; `types`: "TYPE" or "TYPE:TARGET" (target slow by default)."""
    names: list[str] = []
    for p in phases:
        for name in (PHASE_ORDER if p == "all" else (p,)):
            if name not in PHASES:
                raise S2ConvError(f"unknown phase {name!r}; expected all or one of {', '.join(PHASE_ORDER)}")
            if name not in names:
                names.append(name)
    entries = [Entry(n, *PHASES[n], True) for n in names]
    for item in types:
        t, _, target = item.partition(":")
        target = target or "slow"
        entry = Entry(f"{t}-{target}", t, target, False)
        entry.policy()  # validates the type and target now, before any work
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise S2ConvError("nothing to run: give --phase and/or --type")
    return entries


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    out_dir: Path
    results: dict  # the content of all_results.json
    summary: str  # the Markdown table of summary.md
    notes: list[str]  # plots written or skipped


def run_experiment(model: str | Path, out_dir: str | Path, phases=("all",), types=(), *, force: bool = False,
                   settings: ExperimentSettings = ExperimentSettings()) -> ExperimentResult:
    """Run the phases (and `--type` entries) of checkpoint `model` into `out_dir` (see the module docstring)."""
    out = Path(out_dir)
    entries = parse_entries(phases, types)
    ckpt = open_checkpoint(model)
    n_params = sum(v for k, v in ckpt.n_params().items() if k != "codec")
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    run = _Run(ckpt, out, settings, settings.frames_for(n_params), force)
    with threads_for(n_params, settings.device):
        reference = run.reference()
        entry_results = {e.name: run.entry(e) for e in entries}
    results = dict(model=str(ckpt.path), settings=_settings_dict(settings, run.max_frames),
                   reference=reference, phases=_merge_previous(out, entry_results))
    write_json(out / "all_results.json", results)
    _write_size_analysis(ckpt, out / "size_analysis.json")
    _copy_license(ckpt, out)
    summary = format_summary(results)
    (out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    notes = _plots(results, out / "plots")
    return ExperimentResult(out, results, summary, notes)


class _Run:
    """State shared by the entries of one run: the checkpoint, the source model's outputs, the reference clip."""

    def __init__(self, ckpt: Checkpoint, out: Path, settings: ExperimentSettings, max_frames: int, force: bool):
        self.ckpt, self.out, self.settings, self.max_frames, self.force = ckpt, out, settings, max_frames, force
        self.ref_run = None
        self.clip = out / "reference" / "reference.wav"
        self.bf16_bytes: int | None = None
        self.source_hash = ckpt.content_hash()  # the export needs it too (cached); guards resuming

    def _load_done(self, path: Path) -> dict | None:
        """The result of an entry finished earlier from the same checkpoint, unless forced to redo it."""
        done = None if self.force else _load_ok(path)
        if done is not None and done.get("source_sha256") != self.source_hash:
            log.info("%s was made from another checkpoint: redoing it", path.parent.name)
            return None
        return done

    def reference(self) -> dict:
        """The bf16 export and the reference clip it speaks (REFERENCE_TEXT); reused when complete."""
        d = self.out / "reference"
        done = self._load_done(d / "result.json")
        if done and self.clip.is_file():
            self.bf16_bytes = done["file_bytes"]
            return done
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        path = export_gguf(self.ckpt.path, d / "model.gguf", Policy.from_options(type="bf16"), force=True,
                           ckpt=self.ckpt).path
        export_s = time.perf_counter() - t0
        loaded = load_model(path, device=self.settings.device, dtype=self._dtype())
        tts = TTS(loaded, torch.device(self.settings.device))
        t0 = time.perf_counter()
        codes = tts.generate_codes(REFERENCE_TEXT, seed=self.settings.seed, params=self.settings.sampling(),
                                   max_frames=self.max_frames)
        gen_s = time.perf_counter() - t0
        if codes.shape[1] == 0:
            raise S2ConvError("the reference model generated no audio for the reference text (it stopped at once)")
        save_wav(self.clip, tts.decode(codes), tts.sample_rate)
        self.bf16_bytes = path.stat().st_size
        result = dict(name="reference", type="bf16", target="slow", status="ok", source_sha256=self.source_hash,
                      file=str(path.relative_to(self.out)),
                      file_bytes=self.bf16_bytes, clip=str(self.clip.relative_to(self.out)), text=REFERENCE_TEXT,
                      frames=int(codes.shape[1]), frames_per_s=codes.shape[1] / gen_s if gen_s > 0 else None,
                      seconds=dict(export=export_s, generate=gen_s))
        write_json(d / "result.json", result)
        return result

    def entry(self, e: Entry) -> dict:
        d = self.out / e.dirname
        done = self._load_done(d / "result.json")
        if done and all((self.out / p).is_file() for p in done["samples"].values()):
            log.info("%s: complete, skipped", e.name)
            return done
        d.mkdir(parents=True, exist_ok=True)
        result = dict(name=e.name, type=e.type, target=e.target, status="failed", error=None,
                      source_sha256=self.source_hash, file=str((d / "model.gguf").relative_to(self.out)))
        try:
            self._run_entry(e, d, result)
            result["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (any failure of one phase is recorded; the others go on)
            log.warning("%s failed: %s: %s", e.name, type(exc).__name__, exc)
            result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        write_json(d / "result.json", result)
        return result

    def _run_entry(self, e: Entry, d: Path, result: dict) -> None:
        t0 = time.perf_counter()
        path = export_gguf(self.ckpt.path, d / "model.gguf", e.policy(), force=True, ckpt=self.ckpt).path
        result["seconds"] = dict(export=time.perf_counter() - t0)
        result["file_bytes"] = path.stat().st_size
        result["size_vs_bf16"] = result["file_bytes"] / self.bf16_bytes
        result["compression"] = self.bf16_bytes / result["file_bytes"]
        loaded = load_model(path, device=self.settings.device, dtype=self._dtype(), codec_dtype=torch.float32)
        t0 = time.perf_counter()
        if self.ref_run is None:
            self.ref_run = reference_outputs(self.ckpt, self.settings.verify)
        report = verify_gguf(path, self.ckpt, self.settings.verify, ref_run=self.ref_run, loaded=loaded)
        write_json(d / "verify.json", report.to_dict())
        result["verify"] = _compact(report.to_dict())
        result["seconds"]["verify"] = time.perf_counter() - t0
        result["per_layer"] = report.tensors.per_layer() if report.tensors is not None else {}
        result.update(self._synthesize(e, TTS(loaded, torch.device(self.settings.device))))

    def _synthesize(self, e: Entry, tts: TTS) -> dict:
        """{name}_tts.wav (TTS_TEXT) and {name}_clone.wav (CLONE_TEXT in the voice of the reference clip)."""
        s = self.settings
        samples, frames, gen_s = {}, {}, 0.0
        ref = tts.encode_reference(self.clip, REFERENCE_TEXT)
        for kind, text, refs in (("tts", TTS_TEXT, []), ("clone", CLONE_TEXT, [ref])):
            t0 = time.perf_counter()
            codes = tts.generate_codes(text, refs, seed=s.seed, params=s.sampling(), max_frames=self.max_frames)
            gen_s += time.perf_counter() - t0
            path = self.out / "samples" / f"{e.name}_{kind}.wav"
            save_wav(path, tts.decode(codes), tts.sample_rate)
            samples[kind], frames[kind] = str(path.relative_to(self.out)), int(codes.shape[1])
        total = sum(frames.values())
        return dict(samples=samples, frames=frames, synthesis_seconds=gen_s,
                    frames_per_s=total / gen_s if gen_s > 0 else None)

    def _dtype(self) -> torch.dtype:
        from s2conv.verify.verifier import compute_dtype

        n_params = sum(v for k, v in self.ckpt.n_params().items() if k != "codec")
        return compute_dtype(self.settings.verify.dtype, n_params)


def _merge_previous(out: Path, current: dict) -> dict:
    """This run's entries plus those of earlier runs into the same directory (still on disk), phases first."""
    merged = {}
    previous = out / "all_results.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8")).get("phases", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            old = {}
        merged = {n: r for n, r in old.items() if isinstance(r, dict) and (out / r.get("file", "")).parent.is_dir()}
    merged.update(current)
    order = {n: i for i, n in enumerate(PHASE_ORDER)}
    return dict(sorted(merged.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _load_ok(path: Path) -> dict | None:
    """A result.json that records a finished entry, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("status") == "ok" else None


def _compact(verify: dict) -> dict:
    """The verify figures kept in all_results.json (the per-tensor list stays in the phase's verify.json)."""
    tensors = verify.get("tensors") or {}
    return dict(passed=verify["passed"], failures=verify["failures"][:20], formats=verify["formats"],
                tensors=tensors.get("summary"), heads=verify["heads"], audio=verify["audio"], greedy=verify["greedy"],
                greedy_frames_per_s=verify["greedy_frames_per_s"])


def _settings_dict(s: ExperimentSettings, max_frames: int) -> dict:
    v = s.verify
    return jsonable(dict(max_frames=max_frames, seed=s.seed, temperature=s.temperature, top_p=s.top_p,
                         top_k=s.top_k, device=s.device, verify=dict(
                             dtype=v.dtype, levels=list(v.levels), frames=v.probe.frames,
                             greedy_frames=v.probe.greedy_frames, seed=v.probe.seed)))


def _write_size_analysis(ckpt: Checkpoint, path: Path) -> None:
    """Theoretical sizes of every type and target, for this checkpoint's shapes and for the real S2 Pro's."""
    from s2conv.converter.sizes import size_table

    write_json(path, dict(this_model=size_table(ckpt.config, ckpt.codec_config), s2_pro=size_table()))


def _copy_license(ckpt: Checkpoint, out: Path) -> None:
    for name in LICENSE_FILES:
        src = Path(ckpt.path) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            return


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def _num(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def format_summary(results: dict) -> str:
    """The Markdown table of summary.md: one row per entry."""
    head = ("| phase | type | target | size MB | vs bf16 | slow AR rel RMSE | semantic KL | semantic top-1 | "
            "fast KL | fast top-1 | codec SNR dB | greedy frames match | frames/s | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = results.get("reference") or {}
    if ref:
        lines.append(f"| reference | bf16 | - | {_num(ref.get('file_bytes', 0) / 1e6, '.2f')} | 100.0% | 0 | 0 | 1 | "
                     f"0 | 1 | - | - | {_num(ref.get('frames_per_s'), '.1f')} | ok |")
    for name, r in results["phases"].items():
        v = r.get("verify") or {}
        t = (v.get("tensors") or {}).get("slow_ar") or {}
        heads = v.get("heads") or {}
        sem, fast = heads.get("semantic") or {}, heads.get("fast") or {}
        audio, greedy = v.get("audio") or {}, v.get("greedy") or {}
        size = r.get("file_bytes")
        status = "ok" if r["status"] == "ok" and v.get("passed", True) else (
            "verify FAIL" if r["status"] == "ok" else f"failed: {r.get('error')}")
        lines.append(
            f"| {name} | {r['type']} | {r['target']} | {_num(size / 1e6 if size else None, '.2f')} | "
            f"{_num(100 * r['size_vs_bf16'] if r.get('size_vs_bf16') else None, '.1f')}% | "
            f"{_num(t.get('rel_rmse'), '.4f')} | {_num(sem.get('kl_mean'), '.4g')} | {_num(sem.get('top1'), '.3f')} | "
            f"{_num(fast.get('kl_mean'), '.4g')} | {_num(fast.get('top1'), '.3f')} | "
            f"{_num(audio.get('snr_db'), '.1f')} | {_num(greedy.get('frame_match'), '.2f')} | "
            f"{_num(r.get('frames_per_s'), '.1f')} | {status} |")
    return "\n".join(lines)


def _plots(results: dict, plots: Path) -> list[str]:
    points = []
    notes = []
    for name, r in results["phases"].items():
        sem = ((r.get("verify") or {}).get("heads") or {}).get("semantic") or {}
        if r["status"] == "ok":
            points.append(dict(label=name, bytes=r.get("file_bytes"), kl_mean=sem.get("kl_mean")))
    notes.append(plot_size_vs_error(points, plots / "size_vs_error.png"))
    heatmaps = 0
    for name, r in results["phases"].items():
        if r["status"] == "ok" and r.get("per_layer"):
            per_layer = {c: {int(i): v for i, v in layers.items()} for c, layers in r["per_layer"].items()}
            note = plot_layer_heatmap(per_layer, plots / f"{name}_layers.png", f"{name} ({r['type']}, {r['target']})")
            if not note.startswith("wrote"):
                notes.append(note)
                break
            heatmaps += 1
    if heatmaps:
        notes.append(f"wrote per-layer error heatmaps of {heatmaps} file{'s' if heatmaps > 1 else ''} "
                     f"({plots}/{{name}}_layers.png)")
    return list(dict.fromkeys(notes))


def format_outcome(result: ExperimentResult) -> str:
    """What `s2conv experiment` / `s2conv demo` print: the summary table and where everything is."""
    out = result.out_dir
    n_samples = len(list((out / "samples").glob("*.wav")))
    failed = [n for n, r in result.results["phases"].items() if r["status"] != "ok"]
    lines = [result.summary, "", f"samples: {out / 'samples'} ({n_samples} WAV files; clone reference: "
                                 f"{out / 'reference' / 'reference.wav'})",
             f"results: {out / 'all_results.json'}, {out / 'summary.md'}, {out / 'size_analysis.json'}"]
    lines += [f"plots: {n[len('wrote '):]}" if n.startswith("wrote ") else n for n in result.notes]
    if failed:
        lines.append(f"failed: {', '.join(failed)} (errors in all_results.json; re-run to retry them)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """$S2CONV_CACHE, else ~/.cache/s2conv."""
    import os

    env = os.environ.get("S2CONV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "s2conv"


def tiny_checkpoint(cache: Path | None = None) -> Path:
    """The synthetic tiny checkpoint in the cache, generated (about 2 s) when absent or unreadable."""
    import os

    from s2conv.checkpoint import make_checkpoint

    path = (cache or cache_dir()) / "tiny"
    try:
        open_checkpoint(path)
        return path
    except S2ConvError:
        log.info("generating the tiny checkpoint in %s", path)
    tmp = path.with_name(f".tiny.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_checkpoint("tiny", tmp, seed=0)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a half-written checkpoint never sits at the cache path
    return path


def run_demo(out_dir: str | Path = "s2conv-demo", cache: Path | None = None, force: bool = False) -> str:
    """`s2conv demo`: the full experiment on the tiny synthetic checkpoint, offline. Returns the text to print."""
    model = tiny_checkpoint(cache)
    result = run_experiment(model, out_dir, ("all",), force=force)
    return f"model: synthetic tiny checkpoint at {model}\n" + format_outcome(result)
