"""Batch-1 decode benchmark at the full S2 Pro shapes (same as `s2conv bench`); see `s2conv/bench.py`."""
import sys

from s2conv.bench import main

if __name__ == "__main__":
    sys.exit(main())
