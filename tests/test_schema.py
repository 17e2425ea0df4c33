import json
import math
from pathlib import Path

import pytest

from s2conv.errors import CheckpointError
from s2conv.schema import (S2Config, component_of, hf_to_model_name, is_linear_weight, model_tensor_shapes,
                           model_to_hf_name)

FIXTURES = Path(__file__).parent / "fixtures"


def real_config() -> dict:
    return json.loads((FIXTURES / "s2-pro-config.json").read_text())


def test_real_config_parses_to_s2_pro_values():
    cfg = S2Config.from_hf_config(real_config())
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.n_local_heads, cfg.head_dim) == (36, 2560, 32, 8, 128)
    assert (cfg.n_fast_layer, cfg.fast_dim, cfg.fast_intermediate_size) == (4, 2560, 9728)
    assert (cfg.vocab_size, cfg.codebook_size, cfg.num_codebooks) == (155776, 4096, 10)
    assert (cfg.semantic_begin_id, cfg.semantic_end_id, cfg.eos_token_id) == (151678, 155773, 151645)
    assert cfg.attention_qk_norm and not cfg.fast_attention_qk_norm and cfg.tie_word_embeddings
    assert cfg.rope_base == 1e6 and cfg.norm_eps == 1e-6
    assert cfg == S2Config()  # the defaults are the release


def test_config_round_trips_through_hf_layout():
    cfg = S2Config().replace(n_layer=3, dim=256, vocab_size=1000)
    assert S2Config.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.pop("text_config"), "text_config"),
    (lambda c: c["text_config"].update(dim="wide"), "bad value"),
])
def test_bad_config_is_one_clear_error(mutate, message):
    cfg = real_config()
    mutate(cfg)
    with pytest.raises(CheckpointError, match=message):
        S2Config.from_hf_config(cfg)


def test_model_shapes_match_the_release_table_exactly():
    table = json.loads((FIXTURES / "s2-pro-model-tensors.json").read_text())
    shapes = model_tensor_shapes(S2Config())
    assert list(shapes) == list(table)
    assert shapes == {k: tuple(v) for k, v in table.items()}
    assert sum(math.prod(s) for s in shapes.values()) == 4_561_852_416


def test_name_remap_round_trips_and_classifies():
    table = json.loads((FIXTURES / "s2-pro-model-tensors.json").read_text())
    names = [hf_to_model_name(n) for n in table]
    assert [model_to_hf_name(n) for n in names] == list(table)
    assert "codebook_embeddings.weight" in names and "fast_output.weight" in names
    assert "layers.35.attention.wqkv.weight" in names and "fast_layers.3.feed_forward.w2.weight" in names
    assert sum(map(is_linear_weight, names)) == 36 * 5 + 4 * 5
    assert component_of("fast_layers.0.attention.wo.weight") == "fast_ar"
    assert component_of("layers.0.attention.q_norm.weight") == "slow_ar"
    assert component_of("codebook_embeddings.weight") == "embeddings"
    assert component_of("c.decoder.model.0.conv.weight") == "codec"
    with pytest.raises(CheckpointError, match="cannot map"):
        hf_to_model_name("lm_head.weight")
