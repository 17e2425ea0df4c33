"""Reading real S2 Pro checkpoints (`open_checkpoint`) and writing synthetic ones (`make_checkpoint`).

Names are imported lazily so that `s2conv.checkpoint.presets` (used by the CLI's option choices) loads without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Checkpoint": "reader", "open_checkpoint": "reader", "make_checkpoint": "synth", "PRESETS": "presets",
    "load_tokenizer": "tokenizer_build",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 's2conv.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"s2conv.checkpoint.{_EXPORTS[name]}"), name)
