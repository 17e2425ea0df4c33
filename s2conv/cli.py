"""The `s2conv` command line. Each command parses its options and calls one library function.

Only this module prints. Every S2ConvError becomes one line on stderr and exit status 1.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from s2conv import __version__
from s2conv.checkpoint.presets import PRESETS
from s2conv.errors import S2ConvError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="s2conv")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """GGUF export toolchain and runtime for the Fish Audio S2 Pro text-to-speech model."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", required=True, help="Text to speak; <|speaker:N|> tags split it into turns.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.wav"), show_default=True)
@click.option("--ref", "ref_audio", type=click.Path(path_type=Path), help="Reference clip for voice cloning.")
@click.option("--ref-text", help="Exact transcript of the reference clip.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=30, show_default=True)
@click.option("--max-frames", type=int, default=1024, show_default=True, help="Frame limit per text batch.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Default: cuda when available.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def synth(model: Path, text: str, output: Path, ref_audio: Path | None, ref_text: str | None, seed: int,
          temperature: float, top_p: float, top_k: int, max_frames: int, device: str | None, quiet: bool) -> None:
    """Synthesize speech from a GGUF file into a WAV file."""
    from s2conv.runtime.pipeline import synthesize_to_file

    seconds = synthesize_to_file(model, text, output, ref_audio=ref_audio, ref_text=ref_text, seed=seed,
                                 temperature=temperature, top_p=top_p, top_k=top_k, max_frames=max_frames,
                                 device=device, progress=not quiet)
    click.echo(f"wrote {output} ({seconds:.2f} s of audio)")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="GGUF file to write (not needed with --dry-run).")
@click.option("--type", "type_", help="Linear-weight type: fp8 q8 q4 q3 q2, f32 f16 bf16 q8_0 q6_k q4_0, or a "
              "llama-quantize mix q5_k_m q5_k_s q4_k_m q4_k_s q3_k_m q3_k_s q2_k. Default bf16.")
@click.option("--target", type=click.Choice(["slow", "all"]), help="Quantize the slow AR only (default) or both ARs.")
@click.option("--phase", help="Shorthand for --type/--target: 1a 1b 2a 2b 2c 3a 3b.")
@click.option("--tensor-type", multiple=True, metavar="REGEX=TYPE", help="Per-tensor type override (repeatable).")
@click.option("--keep-type", multiple=True, metavar="REGEX", help="Keep matching tensors at source precision.")
@click.option("--codec-type", default="f16", show_default=True, help="f16 (s2.cpp needs it), f32 or bf16.")
@click.option("--compat", is_flag=True, help="Store q4/q3 as exact Q4_0 and q8 as Q8_0 (any GGUF reader).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and sizes; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--threads", type=click.IntRange(1, 2), default=2, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--no-tokenizer-json", is_flag=True, help="Do not write tokenizer.json next to the output.")
def export(model, output, type_, target, phase, tensor_type, keep_type, codec_type, compat, dry_run, force, threads,
           quiet, no_tokenizer_json) -> None:
    """Export a checkpoint directory to one GGUF file (AR model + codec + tokenizer)."""
    from s2conv.converter import export_report, policy_from_options

    policy = policy_from_options(type=type_, target=target, phase=phase, tensor_type=tensor_type,
                                 keep_type=keep_type, codec_type=codec_type, compat=compat)
    click.echo(export_report(model, output, policy, dry_run=dry_run, force=force, threads=threads,
                             progress=not quiet, tokenizer_json=not no_tokenizer_json))


@cli.command(name="inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--full", is_flag=True, help="Do not shorten long strings and arrays.")
def inspect_cmd(file: Path, as_json: bool, full: bool) -> None:
    """Show a GGUF file's metadata, tensors and per-component sizes (any GGUF file)."""
    import json

    from s2conv.converter.inspect_gguf import format_inspect, inspect_gguf

    info = inspect_gguf(file, full=full)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing directory.")
def unpack(file: Path, output: Path, force: bool) -> None:
    """Write an s2conv GGUF back to the released checkpoint layout (bf16 safetensors, codec.pth, config, tokenizer)."""
    from s2conv.converter.unpack import unpack_gguf

    r = unpack_gguf(file, output, force=force)
    click.echo(f"wrote {r.path} ({r.n_model} model + {r.n_codec} codec tensors)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--compat", is_flag=True, help="Sizes with --compat storage.")
def sizes(as_json: bool, compat: bool) -> None:
    """Theoretical file size of every --type and --target for the real S2 Pro shapes."""
    import json

    from s2conv.converter.sizes import format_sizes, size_table

    table = size_table(compat=compat)
    click.echo(json.dumps(table, indent=1) if as_json else format_sizes(table))


@cli.command(name="make-checkpoint")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Model size: tiny/small for tests, full = real S2 Pro shapes (~11 GB).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to write.")
def make_checkpoint_cmd(preset: str, seed: int, output: Path) -> None:
    """Write a synthetic checkpoint with the released S2 Pro file layout (random, heavy-tailed weights)."""
    from s2conv.checkpoint import make_checkpoint

    click.echo(f"wrote {make_checkpoint(preset, output, seed=seed, progress=True)}")


@cli.command()
@click.argument("checkpoint")
@click.option("--check", is_flag=True, help="Also scan every value for NaN/Inf (reads all data).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(checkpoint: str, check: bool, as_json: bool) -> None:
    """Validate a checkpoint directory (or HF repo id) and summarise its parameters, dtypes and configs."""
    import json

    from s2conv.checkpoint.info import checkpoint_info, format_info

    result = checkpoint_info(checkpoint, check=check)
    click.echo(json.dumps(result, indent=1) if as_json else format_info(result))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--reference", required=True, help="Source checkpoint directory (or HF repo id) of the file.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every figure to this JSON file.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), help="Write PNG plots into this directory.")
@click.option("--max-kl", type=float, help="Fail when a head's mean KL divergence is above this.")
@click.option("--min-top1", type=float, help="Fail when a head's top-1 agreement is below this.")
@click.option("--frames", type=int, default=32, show_default=True, help="Teacher-forced frames per probe prompt.")
@click.option("--greedy-frames", type=int, default=32, show_default=True, help="Greedy synthesis frames (0: skip).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def verify(file, reference, json_path, plots_dir, max_kl, min_top1, frames, greedy_frames, device) -> None:
    """Compare a GGUF file with its source checkpoint: tensors, logits (KL, top-1) and decoded audio."""
    from s2conv.verify import run_verify

    report = run_verify(file, reference, json_path=json_path, plots_dir=plots_dir, max_kl=max_kl,
                        min_top1=min_top1, frames=frames, greedy_frames=greedy_frames, device=device)
    click.echo(report.table())
    report.check()


@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Experiment directory.")
@click.option("--phase", "phases", multiple=True, help="all, or 1a 1b 2a 2b 2c 3a 3b (repeatable).")
@click.option("--type", "types", multiple=True, metavar="TYPE[:TARGET]", help="Also run this --type (repeatable).")
@click.option("--max-frames", type=int, help="Frames per sample (default: 48 for tiny models, 1024 otherwise).")
@click.option("--force", is_flag=True, help="Redo phases that are already complete.")
def experiment(model, output, phases, types, max_frames, force) -> None:
    """Export, verify and synthesize samples for each quantization phase; write a summary and plots."""
    from s2conv.experiment import ExperimentSettings, format_outcome, run_experiment

    result = run_experiment(model, output, phases or (() if types else ("all",)), types, force=force,
                            settings=ExperimentSettings(max_frames=max_frames))
    click.echo(format_outcome(result))


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("s2conv-demo"), show_default=True)
@click.option("--force", is_flag=True, help="Redo phases that are already complete.")
def demo(output, force) -> None:
    """Offline demo: every phase on a synthetic tiny checkpoint (cached in $S2CONV_CACHE or ~/.cache/s2conv)."""
    from s2conv.experiment import run_demo

    click.echo(run_demo(output, force=force))


@cli.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hugging Face model repo (created if needed).")
@click.option("--dry-run", is_flag=True, help="List the files and show the model card; upload nothing.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
def upload(outdir, repo_id, dry_run, private) -> None:
    """Upload an experiment directory to the Hugging Face Hub with a model card (token: HF_TOKEN or login)."""
    from s2conv.upload import upload as upload_dir

    click.echo(upload_dir(outdir, repo_id, dry_run=dry_run, private=private))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Decode speed at the full S2 Pro shapes on this GPU (every format; `s2conv bench --help` for options)."""
    from s2conv.bench import main as bench_main

    sys.exit(bench_main(ctx.args))


def _interrupted() -> None:
    """Exit 130 after an interrupt (Ctrl-C, SIGTERM), once the cleanup handlers have run (no partial output is left
    by then). os._exit skips the interpreter's shutdown: a quantizer thread pool caught mid-chunk could otherwise
    keep the process waiting on its threads, or abort it in torch's teardown (exit -6)."""
    click.echo("error: interrupted", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _interrupted()
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except S2ConvError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()


if __name__ == "__main__":
    main()
