"""tests/reliability: helpers import from this directory and from tests/ (oracle.py)."""
import sys
from pathlib import Path

for d in (Path(__file__).parent, Path(__file__).parent.parent):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
