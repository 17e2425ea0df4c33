"""GGUF export of S2 Pro checkpoints (`export_gguf`), and `inspect`, `unpack`, `sizes` for the files it writes.

policy.py (which format each tensor gets) -> plan.py (the per-tensor plan) -> export.py (streaming writer);
metadata.py holds the GGUF keys, atomic.py the crash-safe output files.
"""
from __future__ import annotations

from pathlib import Path

from s2conv.converter.export import ExportPlan, ExportResult, export_gguf, plan_export
from s2conv.converter.plan import format_plan, format_summary
from s2conv.converter.policy import Policy
from s2conv.errors import ConversionError

__all__ = ["ExportPlan", "ExportResult", "Policy", "export_gguf", "plan_export", "export_report",
           "policy_from_options"]


def policy_from_options(**kw) -> Policy:
    """`Policy.from_options` (CLI values: type, target, phase, tensor_type, keep_type, codec_type, compat)."""
    return Policy.from_options(**kw)


def export_report(model: str | Path, out: Path | None, policy: Policy, *, dry_run: bool = False, force: bool = False,
                  threads: int = 2, progress: bool = False, tokenizer_json: bool = True) -> str:
    """Export (or with dry_run only plan) and return the text report: the plan table for a dry run, then the
    per-component sizes and the file size."""
    from s2conv.checkpoint import open_checkpoint

    if dry_run:
        ckpt = open_checkpoint(model)
        # a placeholder of the hash's length: the planned size stays exact without reading every weight byte
        plan = plan_export(ckpt, policy, Path(ckpt.path), source_hash="0" * 64)
        return "\n".join([format_plan(plan.rows), "", format_summary(plan.summary),
                          f"file: {plan.file_bytes:,} bytes (dry run, nothing written)"])
    if out is None:
        raise ConversionError("no output file: pass -o OUT.gguf (or --dry-run)")
    r = export_gguf(model, out, policy, force=force, threads=threads, progress=progress, tokenizer_json=tokenizer_json)
    lines = [format_summary(r.plan.summary), f"wrote {r.path} ({r.plan.file_bytes:,} bytes) in {r.seconds:.1f} s"]
    if r.tokenizer_json is not None:
        lines.append(f"tokenizer: {r.tokenizer_json}")
    return "\n".join(lines)
