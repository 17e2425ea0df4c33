"""Presenting verify results: the text table, JSON-ready dicts and matplotlib plots (optional dependency).

Non-finite floats (the SNR of an exact tensor is inf) become the strings "inf" / "-inf" / "nan" in JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from s2conv.verify.tensors import COMPONENTS

MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install 's2conv[plot]')"


def jsonable(obj):
    """Recursively turn dataclass dicts / tuples / Paths / non-finite floats into plain JSON values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path | str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(jsonable(obj), indent=2) + "\n", encoding="utf-8")


def report_to_dict(r) -> dict:
    """All figures of a VerifyReport (see verifier.py) as a JSON-ready dict."""
    return jsonable(dict(
        file=str(r.path), reference=str(r.reference), file_bytes=r.file_bytes, formats=r.formats,
        passed=r.passed, failures=r.failures, gates=r.gates,
        tensors=r.tensors.to_dict() if r.tensors is not None else None,
        heads={k: v.to_dict() for k, v in r.heads.items()},
        audio=r.audio.to_dict() if r.audio is not None else None,
        greedy=r.greedy.to_dict() if r.greedy is not None else None,
        greedy_frames_per_s=r.greedy_frames_per_s, seconds=r.seconds,
    ))


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------


def _f(x: float | None, spec: str) -> str:
    """format(x, spec), with None as "-" and non-finite values as inf / -inf / nan, in the spec's width."""
    width = spec.lstrip("<>^").split(".")[0]
    if x is None:
        return format("-", f">{width}")
    if isinstance(x, float) and not math.isfinite(x):
        return format("inf" if x > 0 else ("-inf" if x < 0 else "nan"), f">{width}")
    return format(x, spec)


def format_report(r) -> str:
    """The human-readable summary of a VerifyReport."""
    fmts = ", ".join(f"{k} x{v}" for k, v in sorted(r.formats.items(), key=lambda kv: -kv[1]))
    lines = [f"{r.path.name}: {r.file_bytes / 1e6:.2f} MB ({fmts})", f"reference: {r.reference}"]
    if r.tensors is not None:
        lines += ["", "Tensors      count      params    bpw   rel RMSE    SNR dB   min cos  worst tensor"]
        summ = r.tensors.summary()
        for comp in COMPONENTS + ("total",):
            s = summ.get(comp)
            if s is None:
                continue
            snr = -20 * math.log10(s["rel_rmse"]) if s["rel_rmse"] > 0 else math.inf
            worst = "exact" if s["exact"] else f"{s['worst']} ({s['worst_rel_rmse']:.3g})"
            lines.append(f"{comp:<11} {s['tensors']:>6} {s['params']:>11,} {s['bpw']:>6.2f} {s['rel_rmse']:>10.3e} "
                         f"{_f(snr, '>9.2f')} {s['min_cosine']:>9.6f}  {worst}")
    if r.heads:
        lines += ["", "Heads (teacher-forced)  n    KL mean    KL p99   top-1   |dp| mean  ppl ratio"]
        for head, s in r.heads.items():
            lines.append(f"{head:<20} {s.n:>5} {s.kl_mean:>10.3e} {s.kl_p99:>9.3e} {s.top1:>7.4f} "
                         f"{s.dp_abs_mean:>10.3e} {s.ppl_ratio:>10.5f}")
    if r.audio is not None:
        a = r.audio
        lines += ["", f"Codec decode of the same codes: SNR {_f(a.snr_db, '.2f')} dB, SI-SDR {_f(a.si_sdr_db, '.2f')} "
                      f"dB, log-mel distance {a.mel_distance:.4f} ({a.n_samples} samples)"]
    if r.greedy is not None:
        g = r.greedy
        speed = f", {r.greedy_frames_per_s:.1f} frames/s" if r.greedy_frames_per_s else ""
        lines.append(f"Greedy synthesis vs source: {100 * g.frame_match:.1f}% frames, {100 * g.code_match:.1f}% codes "
                     f"match ({g.frames} vs {g.ref_frames} frames{speed})")
    lines.append("")
    lines += r.notes
    if r.failures:
        lines.append(f"FAIL: {len(r.failures)} problem(s)")
        lines += [f"  {f}" for f in r.failures[:20]]
        if len(r.failures) > 20:
            lines.append(f"  ... and {len(r.failures) - 20} more")
    else:
        lines.append("PASS")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_layer_heatmap(per_layer: dict, path: Path | str, title: str = "") -> str:
    """Heatmap of relative RMSE (log10) per transformer layer (rows; slow then fast) and tensor kind (columns).

    per_layer: `TensorLevel.per_layer()`. Kinds that are exact in every layer (norms) are left out; exact cells
    are grey. Returns a one-line note of what was written or skipped."""
    plt = _pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    import numpy as np

    kinds = sorted({k for comp in per_layer.values() for layer in comp.values() for k, v in layer.items() if v > 0})
    rows, labels = [], []
    for comp in ("slow_ar", "fast_ar"):
        for i, layer in sorted(per_layer.get(comp, {}).items()):
            rows.append([layer.get(k, math.nan) for k in kinds])
            labels.append(f"{'fast ' if comp == 'fast_ar' else ''}{i}")
    if not rows or not kinds:
        return "no per-layer error to plot (every layer tensor is exact)"
    data = np.array(rows, dtype=float)
    shown = np.ma.masked_invalid(np.log10(np.where(data > 0, data, np.nan)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(kinds), 1.5 + 0.3 * len(rows)))
    im = ax.imshow(shown, aspect="auto", cmap=cmap)
    if data.size <= 400:
        for (r, c), v in np.ndenumerate(data):
            ax.text(c, r, "exact" if v == 0 else ("" if math.isnan(v) else f"{v:.2g}"), ha="center", va="center",
                    fontsize=7, color="black" if v == 0 or math.isnan(v) else "white")
    ax.set_xticks(range(len(kinds)), [k.replace(".weight", "") for k in kinds], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="log10 relative RMSE")
    ax.set_title(title or "per-layer tensor error")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def plot_size_vs_error(points: list[dict], path: Path | str, error_key: str = "kl_mean",
                       error_label: str = "semantic head mean KL") -> str:
    """Scatter of file size (MB) against an error figure, one labelled point per file.

    points: dicts with "label", "bytes" and `error_key`. Returns a one-line note."""
    plt = _pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    pts = [p for p in points if isinstance(p.get(error_key), (int, float)) and p.get("bytes")]
    if not pts:
        return "no points to plot"
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["bytes"] / 1e6 for p in pts]
    ys = [max(float(p[error_key]), 1e-12) for p in pts]
    ax.scatter(xs, ys)
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(error_label)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def write_verify_outputs(report, json_path: Path | str | None = None, plots_dir: Path | str | None = None) -> list[str]:
    """The `--json` and `--plots` outputs of `s2conv verify`; returns one-line notes for the user."""
    notes = []
    if json_path is not None:
        write_json(json_path, report.to_dict())
        notes.append(f"wrote {json_path}")
    if plots_dir is not None and report.tensors is not None:
        stem = Path(report.path).stem
        notes.append(plot_layer_heatmap(report.tensors.per_layer(), Path(plots_dir) / f"{stem}_layers.png", stem))
    return notes
