"""s2conv: GGUF export toolchain and CUDA runtime for Fish Audio S2 Pro."""

__version__ = "0.1.0"
