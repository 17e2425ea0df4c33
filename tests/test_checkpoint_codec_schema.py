"""Codec tensor table, its inverse (config from shapes) and weight-norm folding."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from s2conv.checkpoint import PRESETS
from s2conv.codec_schema import (codec_config_from_shapes, codec_tensor_shapes, fold_weight_norm,
                                 fold_weight_norm_name, folded_codec_tensor_shapes, is_transposed_conv,
                                 weight_norm_pairs)
from s2conv.errors import CheckpointError
from s2conv.schema import CodecConfig

FIXTURES = Path(__file__).parent / "fixtures"


def test_full_codec_shapes_equal_the_release_table():
    table = {k: tuple(v) for k, v in json.loads((FIXTURES / "s2-pro-codec-tensors.json").read_text()).items()}
    shapes = codec_tensor_shapes(CodecConfig())
    assert shapes == table and len(shapes) == 535
    assert sum(math.prod(s) for s in shapes.values()) == 391_430_530
    names = list(shapes)
    assert sum(n.endswith("original1") for n in names) == 60 and sum(n.endswith("weight_v") for n in names) == 20


@pytest.mark.parametrize("cc", [CodecConfig(), PRESETS["tiny"].codec, PRESETS["small"].codec,
                                CodecConfig(encoder_rates=(2, 4, 8), decoder_rates=(8, 4, 2, 2), latent_dim=512,
                                            encoder_transformer_layers=(0, 2, 0), n_residual_codebooks=3,
                                            downsample_factor=(2, 3), rvq_n_layer=2, n_head=8,
                                            intermediate_size=1024)],
                         ids=["full", "tiny", "small", "odd"])
def test_config_from_shapes_inverts_the_table_with_release_and_folded_names(cc):
    assert codec_config_from_shapes(codec_tensor_shapes(cc)) == cc
    assert codec_config_from_shapes(folded_codec_tensor_shapes(cc)) == cc


def test_config_from_shapes_names_what_is_missing():
    shapes = codec_tensor_shapes(CodecConfig())
    del shapes["quantizer.semantic_quantizer.quantizers.0.codebook.weight"]
    with pytest.raises(CheckpointError, match="quantizer.semantic_quantizer.quantizers.0.codebook.weight"):
        codec_config_from_shapes(shapes)


def test_folded_names_pair_up():
    names = list(codec_tensor_shapes(CodecConfig()))
    pairs = weight_norm_pairs(names)
    assert len(pairs) == 80
    assert pairs["encoder.block.0.conv.weight"] == ("encoder.block.0.conv.parametrizations.weight.original0",
                                                    "encoder.block.0.conv.parametrizations.weight.original1")
    assert pairs["quantizer.quantizer.quantizers.3.in_proj.weight"] == (
        "quantizer.quantizer.quantizers.3.in_proj.weight_g", "quantizer.quantizer.quantizers.3.in_proj.weight_v")
    assert fold_weight_norm_name("quantizer.downsample.0.0.conv.weight") == "quantizer.downsample.0.0.conv.weight"
    folded = folded_codec_tensor_shapes(CodecConfig())
    assert len(folded) == 455 and folded["decoder.model.1.block.1.conv.weight"] == (1536, 768, 16)
    assert sum(is_transposed_conv(n) for n in folded) == 4 * 2  # weight + bias of 4 ConvTranspose1d


@pytest.mark.parametrize("transposed", [False, True])
def test_fold_matches_torch_parametrized_weight_norm(transposed):
    torch.manual_seed(0)
    conv = nn.ConvTranspose1d(12, 6, 8, stride=4) if transposed else nn.Conv1d(6, 12, 7)
    conv = nn.utils.parametrizations.weight_norm(conv, dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(torch.rand(conv.parametrizations.weight.original0.shape) + 0.5)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (v.shape[0], 1, 1)  # dim 0: in-channels for the transposed conv
    torch.testing.assert_close(fold_weight_norm(g.detach(), v.detach(), transposed=transposed),
                               conv.weight.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fold_matches_legacy_weight_norm_and_checks_shapes():
    torch.manual_seed(1)
    conv = nn.utils.weight_norm(nn.Conv1d(1024, 8, 1))  # dac's WNConv1d (weight_g / weight_v)
    out = fold_weight_norm(conv.weight_g.detach().bfloat16(), conv.weight_v.detach().bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, conv.weight.detach(), rtol=1e-2, atol=1e-3)
    with pytest.raises(CheckpointError, match="does not match"):
        fold_weight_norm(torch.ones(4, 1, 1), torch.ones(8, 3, 1))
