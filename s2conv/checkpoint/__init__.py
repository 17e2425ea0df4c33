"""Reading real S2 Pro checkpoints (`open_checkpoint`) and writing synthetic ones (`make_checkpoint`)."""
from s2conv.checkpoint.reader import Checkpoint, open_checkpoint
from s2conv.checkpoint.synth import PRESETS, make_checkpoint
from s2conv.checkpoint.tokenizer_build import load_tokenizer

__all__ = ["Checkpoint", "open_checkpoint", "make_checkpoint", "PRESETS", "load_tokenizer"]
