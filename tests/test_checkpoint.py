import math

import torch

from s2conv.checkpoint import PRESETS, open_checkpoint
from s2conv.codec_schema import codec_tensor_shapes
from s2conv.schema import hf_to_model_name, model_tensor_shapes


def test_tiny_checkpoint_reads_back_with_schema_names_shapes_and_dtypes(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    preset = PRESETS["tiny"]
    assert ckpt.config == preset.config and ckpt.codec_config == preset.codec
    expected = {hf_to_model_name(n): s for n, s in model_tensor_shapes(preset.config).items()}
    assert ckpt.model_names() == list(expected)
    for name, shape in expected.items():
        assert ckpt.model_shape(name) == shape and ckpt.model_dtype(name) == torch.bfloat16
    assert ckpt.codec_names() == list(codec_tensor_shapes(preset.codec))
    counts = ckpt.n_params()
    assert counts["codec"] == sum(math.prod(s) for s in codec_tensor_shapes(preset.codec).values())
    assert counts["slow_ar"] + counts["fast_ar"] + counts["embeddings"] == sum(map(math.prod, expected.values()))
