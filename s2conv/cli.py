"""The `s2conv` command line. Each command parses its options and calls one library function.

Only this module prints. Every S2ConvError becomes one line on stderr and exit status 1.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from s2conv import __version__
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
def synth(model: Path, text: str, output: Path, ref_audio: Path | None, ref_text: str | None, seed: int,
          temperature: float, top_p: float, top_k: int, max_frames: int, device: str | None) -> None:
    """Synthesize speech from a GGUF file into a WAV file."""
    from s2conv.runtime.pipeline import synthesize_to_file

    seconds = synthesize_to_file(model, text, output, ref_audio=ref_audio, ref_text=ref_text, seed=seed,
                                 temperature=temperature, top_p=top_p, top_k=top_k, max_frames=max_frames,
                                 device=device)
    click.echo(f"wrote {output} ({seconds:.2f} s of audio)")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except S2ConvError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
