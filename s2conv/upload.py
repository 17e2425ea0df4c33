"""`s2conv upload`: publish an experiment directory to the Hugging Face Hub with a generated model card.

The card (README.md) lists every file with its format and size, the verify figures of all_results.json, how to run
the files, and the license inherited from the source model (Fish Audio Research License). Failed phases are not
uploaded. `dry_run` lists the files and returns the card without touching the network.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from s2conv.errors import S2ConvError

log = logging.getLogger(__name__)

BASE_MODEL = "fishaudio/s2-pro"
LICENSE_NAME = "Fish Audio Research License"
LICENSE_ID = "fish-audio-research-license"
LICENSE_URL = "https://huggingface.co/fishaudio/s2-pro/blob/main/LICENSE.md"
TOP_FILES = ("all_results.json", "size_analysis.json", "summary.md", "LICENSE.md", "LICENSE", "LICENSE.txt")
ENTRY_FILES = ("model.gguf", "tokenizer.json", "result.json", "verify.json")

FORMAT_NOTES = {
    "fp8": "per-row float8 e4m3 with a float32 row scale (s2conv format)",
    "q8": "per-row symmetric INT8 with a float32 row scale (s2conv format)",
    "q4": "INT4 in groups of 128 with a float32 scale (s2conv format)",
    "q3": "INT3 in groups of 128 with a float32 scale (s2conv format)",
    "q2": "ternary {-1, 0, 1} in groups of 64 with a float32 scale (s2conv format)",
    "bf16": "bfloat16, unquantized",
}


@dataclass
class UploadPlan:
    out_dir: Path
    repo_id: str
    files: list[Path]  # relative to out_dir
    card: str

    @property
    def total_bytes(self) -> int:
        return sum((self.out_dir / f).stat().st_size for f in self.files)

    def listing(self) -> str:
        lines = [f"{(self.out_dir / f).stat().st_size / 1e6:>10.2f} MB  {f.as_posix()}" for f in self.files]
        lines.append(f"{self.total_bytes / 1e6:>10.2f} MB  total, {len(self.files)} files + README.md")
        return "\n".join(lines)


def load_results(out_dir: Path) -> dict:
    path = out_dir / "all_results.json"
    if not path.is_file():
        raise S2ConvError(f"{out_dir}: no all_results.json (run `s2conv experiment` into this directory first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise S2ConvError(f"{path}: not valid JSON ({e})") from None


def upload_files(out_dir: Path, results: dict) -> list[Path]:
    """Files to publish (relative paths): top-level results, the reference export, every successful entry's
    directory files, the samples and the plots."""
    files = [Path(n) for n in TOP_FILES if (out_dir / n).is_file()]
    dirs = [Path("reference")] + [Path(r["file"]).parent for r in results.get("phases", {}).values()
                                  if r.get("status") == "ok"]
    for d in dirs:
        files += [d / n for n in ENTRY_FILES + ("reference.wav",) if (out_dir / d / n).is_file()]
    ok_names = {n for n, r in results.get("phases", {}).items() if r.get("status") == "ok"}
    for wav in sorted((out_dir / "samples").glob("*.wav")):
        if wav.stem.rsplit("_", 1)[0] in ok_names:
            files.append(wav.relative_to(out_dir))
    files += sorted(p.relative_to(out_dir) for p in (out_dir / "plots").glob("*.png"))
    return files


def model_card(results: dict, repo_id: str, has_license_file: bool) -> str:
    """The README.md of the upload (Hub front matter + Markdown)."""
    from s2conv.experiment import format_summary

    phases = {n: r for n, r in results.get("phases", {}).items() if r.get("status") == "ok"}
    ref = results.get("reference") or {}
    license_link = "LICENSE.md" if has_license_file else LICENSE_URL
    lines = [
        "---", "license: other", f"license_name: {LICENSE_ID}", f"license_link: {license_link}",
        f"base_model: {BASE_MODEL}", "pipeline_tag: text-to-speech", "tags:", "- gguf", "- text-to-speech",
        "- fish-speech", "- s2conv", "---", "",
        f"# {repo_id.split('/')[-1]}: GGUF files of Fish Audio S2 Pro", "",
        f"Quantized exports of [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}) (source checkpoint: "
        f"`{Path(results.get('model', '?')).name}`) made with s2conv: the dual-AR transformer and the codec in one "
        "GGUF file each, checked against the source with `s2conv verify`.", "",
        "## Files", "",
        "| file | linear weights | quantized | size | vs bf16 |", "|---|---|---|---|---|",
    ]
    if ref:
        lines.append(f"| `{ref.get('file', 'reference/model.gguf')}` | bf16 | - | "
                     f"{ref.get('file_bytes', 0) / 1e6:.1f} MB | 100% |")
    for r in phases.values():
        target = "slow AR" if r["target"] == "slow" else "slow + fast AR"
        lines.append(f"| `{r['file']}` | {r['type']} | {target} | {r['file_bytes'] / 1e6:.1f} MB | "
                     f"{100 * r['size_vs_bf16']:.1f}% |")
    used = sorted({r["type"] for r in phases.values()} | {"bf16"})
    lines += ["", "Formats:"] + [f"- `{t}`: {FORMAT_NOTES.get(t, 'ggml block type (any GGUF reader)')}" for t in used]
    lines += ["", "Embeddings, norms and the output heads keep source precision; the codec is float16. The s2conv "
              "formats are stored as raw bytes with `s2conv.format.*` metadata and load in the s2conv runtime; ggml "
              "types also load in other GGUF readers.", "",
              "## Quality", "",
              "Figures from `s2conv verify` (relative RMSE of the slow-AR weights; mean KL divergence and top-1 "
              "agreement of the teacher-forced semantic head and fast-AR codebook heads against the bf16 source; "
              "SNR of the codec decoding the same codes; share of greedy frames equal to the source's) and the "
              "synthesis speed of the run:", "", format_summary(dict(reference=ref, phases=phases)), "",
              "Samples of every file (plain TTS and voice cloning from `reference/reference.wav`) are in `samples/`; "
              "all figures are in `all_results.json`.", "",
              "## Usage", "", "```bash", "pip install s2conv",
              f"s2conv synth {next(iter(phases.values()))['file'] if phases else 'reference/model.gguf'} "
              "--text \"Hello from S2 Pro.\" -o hello.wav", "```", "",
              "## License", "",
              f"These files are derived from {BASE_MODEL} and inherit its license, the **{LICENSE_NAME}** "
              f"(non-commercial use; see [{'LICENSE.md' if has_license_file else 'the license'}]({license_link})). "
              "Commercial use requires a license from Fish Audio."]
    return "\n".join(lines) + "\n"


def plan_upload(out_dir: str | Path, repo_id: str) -> UploadPlan:
    out = Path(out_dir)
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise S2ConvError(f"--repo-id {repo_id!r}: expected USER/NAME")
    results = load_results(out)
    files = upload_files(out, results)
    if not any(f.name == "model.gguf" for f in files):
        raise S2ConvError(f"{out}: no successful export to upload")
    has_license = any(f.name.startswith("LICENSE") for f in files)
    return UploadPlan(out, repo_id, files, model_card(results, repo_id, has_license))


def upload(out_dir: str | Path, repo_id: str, *, dry_run: bool = False, token: str | None = None,
           private: bool = False) -> str:
    """Upload the experiment directory to the model repo `repo_id` (created if needed). Returns the text to print:
    the file list and, for a dry run, the model card. The token comes from `token`, $HF_TOKEN or a saved login."""
    plan = plan_upload(out_dir, repo_id)
    if dry_run:
        return "\n".join([f"dry run: would upload to https://huggingface.co/{repo_id}", plan.listing(), "",
                          "README.md:", plan.card])
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise S2ConvError("uploading needs huggingface_hub (pip install 's2conv[hub]')") from None
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise S2ConvError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    (plan.out_dir / "README.md").write_text(plan.card, encoding="utf-8")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=plan.out_dir, repo_type="model",
                                 allow_patterns=[f.as_posix() for f in plan.files] + ["README.md"],
                                 commit_message="Upload GGUF exports made with s2conv")
    except Exception as e:  # network, auth and Hub errors come in many types; the user gets one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise S2ConvError(f"upload to {repo_id} failed: {type(e).__name__}: {first}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return f"{plan.listing()}\nuploaded to {url}"
