"""Exception types. Every user-facing failure is one of these; the CLI prints its message as one line."""


class S2ConvError(Exception):
    """Base class: a failure the user can act on (bad input, bad file, bad option)."""


class CheckpointError(S2ConvError):
    """A checkpoint directory is missing, incomplete, malformed or unsafe."""


class QuantFormatError(S2ConvError):
    """A tensor cannot be quantized or decoded in the requested format."""


class SchemaError(S2ConvError):
    """A GGUF file lacks or mistypes metadata or tensors that s2conv relies on."""


class GGUFFormatError(S2ConvError):
    """A GGUF file is not well formed (truncated, overlapping, bad counts...)."""


class ConversionError(S2ConvError):
    """Export or unpack failed."""


class RuntimeModelError(S2ConvError):
    """Loading a model or synthesizing speech failed."""
