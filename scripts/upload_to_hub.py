#!/usr/bin/env python
"""Upload an experiment directory: `python scripts/upload_to_hub.py --output ./output --repo-id USER/NAME`.

A thin wrapper over `s2conv upload` (s2conv.upload.upload); the token comes from HF_TOKEN or a saved login.
"""
from __future__ import annotations

import argparse
import sys

from s2conv.errors import S2ConvError
from s2conv.upload import upload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="./output", help="experiment directory (from scripts/quantize.py)")
    ap.add_argument("--repo-id", required=True, metavar="USER/NAME")
    ap.add_argument("--dry-run", action="store_true", help="list files and show the model card only")
    ap.add_argument("--private", action="store_true")
    args = ap.parse_args(argv)
    try:
        print(upload(args.output, args.repo_id, dry_run=args.dry_run, private=args.private))
    except S2ConvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
