"""Quantization formats: s2conv's group-wise block formats and the ggml block types, one module each.

No file I/O and no model knowledge here; formats see 2-D arrays only.
"""
from s2conv.quant_formats.base import QuantFormat, format_for_ggml_type, get_format, list_formats
from s2conv.quant_formats import q2_k, q3_k, q4_k, q5_k, q6_k  # noqa: F401,E402  (registers the ggml K-quants)

from s2conv.quant_formats import float_types, q4_0, q4_1, q5_0, q5_1, q8_0, tq2_0  # noqa: F401,E402  (ggml types)
from s2conv.quant_formats import ggml_dequant_only  # noqa: F401,E402  (ggml types s2conv only decodes)
from s2conv.quant_formats import fp8, q2, q3, q4, q8  # noqa: F401,E402  (s2conv's own group-wise formats)

__all__ = ["QuantFormat", "format_for_ggml_type", "get_format", "list_formats"]
