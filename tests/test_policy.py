"""The export policy: which format each tensor gets (llama-quantize mixes, targets, overrides, fallbacks)."""
import functools

import pytest

from s2conv.converter.plan import build_plan, model_sources, summarize
from s2conv.converter.policy import MIXES, PHASES, TYPE_CHOICES, ModelDims, Policy, use_more_bits
from s2conv.errors import ConversionError, QuantFormatError
from s2conv.schema import S2Config, hf_to_model_name, model_tensor_shapes

S2 = S2Config()
SHAPES = {hf_to_model_name(n): s for n, s in model_tensor_shapes(S2).items()}


@functools.lru_cache(maxsize=None)
def plan(policy):
    rows = build_plan(model_sources(SHAPES, SHAPES.__getitem__, lambda n: "bf16"), policy)
    return {r.name: r for r in rows}


def test_use_more_bits_36_layers_matches_llama_quantize():
    more = [i for i in range(36) if use_more_bits(i, 36)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35]


def test_q4_k_m_mix_on_s2_pro():
    rows = plan(Policy(type="q4_k_m"))
    assert rows["layers.0.attention.wqkv.weight"].format == "q6_k"  # v-like, use_more_bits
    assert rows["layers.4.attention.wqkv.weight"].format == "q4_k"
    assert rows["layers.6.feed_forward.w2.weight"].format == "q6_k"
    assert rows["layers.7.feed_forward.w2.weight"].format == "q4_k"
    assert rows["layers.0.attention.wo.weight"].format == "q4_k"
    assert rows["layers.0.feed_forward.w1.weight"].format == "q4_k"
    # target slow: fast AR, embeddings, norms stay
    assert rows["fast_layers.0.attention.wqkv.weight"].format == "bf16"
    assert rows["embeddings.weight"].format == "bf16"
    assert rows["layers.0.attention_norm.weight"].format == "f32"
    assert rows["layers.0.attention.q_norm.weight"].format == "f32"


@pytest.mark.parametrize("mix,kind,layer,want", [
    ("q2_k", "attention.wqkv", 10, "q4_k"),  # GQA 4 -> Q4_K
    ("q2_k", "feed_forward.w2", 10, "q3_k"),
    ("q2_k", "attention.wo", 10, "q3_k"),
    ("q2_k", "feed_forward.w1", 10, "q2_k"),
    ("q3_k_m", "attention.wqkv", 1, "q5_k"),
    ("q3_k_m", "attention.wqkv", 2, "q4_k"),
    ("q3_k_m", "feed_forward.w2", 1, "q5_k"),  # i < 36/16
    ("q3_k_m", "feed_forward.w2", 2, "q4_k"),
    ("q3_k_m", "attention.wo", 20, "q4_k"),
    ("q3_k_s", "attention.wqkv", 0, "q3_k"),
    ("q4_k_s", "attention.wqkv", 3, "q5_k"),
    ("q4_k_s", "attention.wqkv", 4, "q4_k"),
    ("q4_k_s", "feed_forward.w2", 3, "q5_k"),  # i < 36/8
    ("q4_k_s", "feed_forward.w2", 4, "q4_k"),
    ("q5_k_m", "feed_forward.w2", 35, "q6_k"),
    ("q5_k_m", "feed_forward.w3", 35, "q5_k"),
    ("q5_k_s", "attention.wqkv", 0, "q5_k"),
])
def test_mix_rules(mix, kind, layer, want):
    assert plan(Policy(type=mix))[f"layers.{layer}.{kind}.weight"].format == want


def test_target_all_counts_fast_layers_on_their_own():
    rows = plan(Policy(type="q4_k_m", target="all"))
    # 4 fast layers: use_more_bits(i, 4) is true for i = 2, 3
    assert [rows[f"fast_layers.{j}.attention.wqkv.weight"].format for j in range(4)] == ["q4_k", "q4_k", "q6_k", "q6_k"]
    assert rows["fast_output.weight"].format == "bf16"
    assert rows["fast_norm.weight"].format == "f32"


def test_tensor_type_overrides_first_match_and_heads_follow_output_rule():
    p = Policy.from_options(type="q4_k_m", tensor_type=[r"layers\.0\..*=q8_0", r"^embeddings\.weight$=q4_k_m",
                                                        r"codebook_embeddings=q4_k_m", r"norm=q4_0", "wo=keep"])
    rows = plan(p)
    assert rows["layers.0.attention.wqkv.weight"].format == "q8_0"
    assert rows["embeddings.weight"].format == "q6_k"  # tied head: llama's output.weight rule
    assert rows["codebook_embeddings.weight"].format == "q4_k"  # embedding table: the mix's base
    assert rows["layers.1.attention_norm.weight"].format == "f32"  # norms are never quantized
    assert rows["layers.3.attention.wo.weight"].format == "bf16"


def test_keep_type_wins_over_type():
    rows = plan(Policy.from_options(type="q8_0", keep_type=[r"layers\.(34|35)\.feed_forward\.w2"]))
    assert rows["layers.35.feed_forward.w2.weight"].format == "bf16"
    assert rows["layers.33.feed_forward.w2.weight"].format != "bf16"


def test_fallback_when_row_not_multiple_of_256():
    shapes = {"layers.0.attention.wqkv.weight": (96, 160), "layers.0.feed_forward.w2.weight": (64, 96),
              "layers.0.feed_forward.w1.weight": (64, 100)}
    rows = {r.name: r for r in build_plan(model_sources(shapes, shapes.__getitem__, lambda n: "bf16"),
                                          Policy(type="q4_k_m", dims=ModelDims(n_layer=1)))}
    assert rows["layers.0.attention.wqkv.weight"].format == "q8_0"  # q6_k -> q8_0 (160 = 5 * 32)
    assert rows["layers.0.feed_forward.w2.weight"].format == "q8_0"
    assert rows["layers.0.feed_forward.w1.weight"].format == "bf16"  # 100: no block fits -> source precision
    assert "q4_k" in rows["layers.0.feed_forward.w1.weight"].rule


def test_phases():
    assert Policy.from_options(phase="2a").type == "q4" and Policy.from_options(phase="2a").target == "all"
    assert set(PHASES) == {"1a", "1b", "2a", "2b", "2c", "3a", "3b"}
    with pytest.raises(ConversionError, match="--phase 1a means --type fp8"):
        Policy.from_options(phase="1a", type="q4")


@pytest.mark.parametrize("kw,msg", [
    (dict(type="q7"), "unknown --type"), (dict(target="fast"), "unknown --target"),
    (dict(phase="9z"), "unknown --phase"), (dict(codec_type="q4_0"), "unknown --codec-type"),
    (dict(tensor_type=["nope"]), "REGEX=TYPE"), (dict(tensor_type=["(=q8_0"]), "bad regular expression"),
    (dict(tensor_type=["w1=q9"]), "unknown tensor type"),
])
def test_bad_options_raise_one_line_errors(kw, msg):
    with pytest.raises(ConversionError, match=msg) as e:
        Policy.from_options(**kw)
    assert "\n" not in str(e.value)


def test_every_ggml_type_plans_on_s2_pro_and_sizes_shrink():
    sizes = {}
    for t in TYPE_CHOICES:
        try:
            sizes[t] = summarize(list(plan(Policy(type=t)).values()))["slow_ar"]["bpw"]
        except QuantFormatError:  # S2 formats may not be registered yet
            if t in ("fp8", "q8", "q4", "q3", "q2"):
                continue
            raise
    assert sizes["bf16"] == pytest.approx(16.0, abs=0.01)
    assert sizes["q8_0"] == pytest.approx(8.5, abs=0.05)
    assert 4.5 < sizes["q4_k_m"] < 5.2
    assert sizes["q2_k"] < sizes["q3_k_m"] < sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < sizes["q8_0"]
    assert set(MIXES) <= set(sizes)
