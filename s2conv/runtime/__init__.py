"""The S2 Pro runtime: GGUF loader, dual-AR model, codec, sampling and the synthesis pipeline.

    tts = s2conv.runtime.load("model.gguf"); wav = tts.synthesize("Hello")
"""


def load(path, device=None, dtype=None):
    """Load a GGUF file for synthesis; see `s2conv.runtime.pipeline.load`."""
    from s2conv.runtime.pipeline import load as _load

    return _load(path, device=device, dtype=dtype)
