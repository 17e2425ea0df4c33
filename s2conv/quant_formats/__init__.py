"""Quantization formats: s2conv's group-wise block formats and the ggml block types, one module each.

No file I/O and no model knowledge here; formats see 2-D arrays only.
"""
from s2conv.quant_formats.base import QuantFormat, format_for_ggml_type, get_format, list_formats

__all__ = ["QuantFormat", "format_for_ggml_type", "get_format", "list_formats"]
