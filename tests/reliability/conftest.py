"""tests/reliability: helpers import from this directory and from tests/ (oracle.py)."""
import importlib.util
import sys
from pathlib import Path

for d in (Path(__file__).parent, Path(__file__).parent.parent):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))

# scripts/fuzz.py as the module `s2conv_fuzz` (the mutator, the case runner and the C loader check)
_spec = importlib.util.spec_from_file_location("s2conv_fuzz", Path(__file__).parents[2] / "scripts" / "fuzz.py")
if "s2conv_fuzz" not in sys.modules:
    sys.modules["s2conv_fuzz"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["s2conv_fuzz"])
