#!/usr/bin/env python
"""Run the quantization experiment: `python scripts/quantize.py --phase all --output ./output`.

A thin wrapper over `s2conv experiment` (s2conv.experiment.run_experiment) with the real model as default source.
"""
from __future__ import annotations

import argparse
import logging
import sys

from s2conv.errors import S2ConvError
from s2conv.experiment import PHASE_ORDER, ExperimentSettings, format_outcome, run_experiment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fishaudio/s2-pro", help="checkpoint directory or HF repo id")
    ap.add_argument("--phase", action="append", choices=("all",) + PHASE_ORDER,
                    help="phase to run (repeatable; default all)")
    ap.add_argument("--type", action="append", default=[], metavar="TYPE[:TARGET]", help="also run this --type")
    ap.add_argument("--output", default="./output", help="experiment directory")
    ap.add_argument("--max-frames", type=int, help="frames per sample")
    ap.add_argument("--force", action="store_true", help="redo complete phases")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    phases = args.phase or ([] if args.type else ["all"])
    try:
        result = run_experiment(args.model, args.output, phases, args.type, force=args.force,
                                settings=ExperimentSettings(max_frames=args.max_frames))
    except S2ConvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_outcome(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
