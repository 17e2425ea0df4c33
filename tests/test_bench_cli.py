"""`s2conv bench` (the GPU decode benchmark): a clear refusal without a GPU, and its Markdown report."""
import subprocess
import sys

import pytest
import torch

from s2conv.bench import append_markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_without_a_gpu_is_one_line_and_nonzero():
    r = subprocess.run([sys.executable, "-m", "s2conv", "bench", "--formats", "bf16"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: s2conv bench needs a CUDA GPU"


def test_unknown_baseline_mode_is_one_line_before_any_gpu_work():
    r = subprocess.run([sys.executable, "-m", "s2conv", "bench", "--fish-speech", "eager,bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --fish-speech takes eager, compiled or none, not 'bogus'"


def test_results_section_names_the_card_and_every_row(tmp_path):
    result = dict(date="2026-11-26", gpu="NVIDIA H100 80GB HBM3", torch="2.11", hbm={"read": 3038.0, "copy": 3020.0},
                  prompt=256, frames=100, codec=None,
                  rows=[dict(format="q4", target="all", ms_per_frame=5.59, frames_per_s=179.0, rtf=0.12,
                             read_share=0.26, ready_s=7.25, first_frame_ms=31.44),
                        dict(format="q3", target="slow", error="RuntimeError: boom")])
    out = tmp_path / "RESULTS.md"
    out.write_text("# earlier\n")
    append_markdown(str(out), result)
    text = out.read_text()
    assert text.startswith("# earlier\n") and "NVIDIA H100 80GB HBM3" in text and "3038 GB/s" in text
    assert "| q4 | all | 5.59 | 179.0 | 0.120 | 26% | - | 7.2 | 31.4 |" in text and "error: RuntimeError: boom" in text


def test_results_section_lists_the_fish_speech_baseline(tmp_path):
    result = dict(date="2026-11-26", gpu="NVIDIA H100 80GB HBM3", torch="2.11", hbm={"read": 3038.0, "copy": 3020.0},
                  prompt=256, frames=100, codec=None, rows=[],
                  fish_speech=[dict(compiled=True, ms_per_frame=9.42, frames_per_s=106.2, rtf=0.203, first_call_s=258.6)])
    out = tmp_path / "RESULTS.md"
    append_markdown(str(out), result)
    assert "| fish-speech 0.1.0 step, compiled (reduce-overhead) (baseline, first call 259 s) | - | 9.42 | 106.2 |" \
        in out.read_text()


def test_kernel_check_passes_the_kernels_and_catches_one_that_disagrees():
    """`s2conv bench` refuses to time a format whose kernels disagree with the reference path: the check runs the
    real kernels (triton's interpreter here) on one linear per shape."""
    from s2conv.bench import check_linears, quantize_model
    from s2conv.runtime.dual_ar import DualARTransformer
    from s2conv.runtime.qlinear import QuantLinear
    from test_runtime_math import TINY, random_s2_weights

    model = DualARTransformer(TINY)
    model.load_weights({k: v.to(torch.bfloat16) for k, v in random_s2_weights(TINY).items()})
    plain = check_linears(model, "all")  # bf16 nn.Linear: the bf16 GEMV that decoding uses
    assert plain["ok"] and plain["shapes"] >= 3
    quantize_model(model, "q8", "all")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.prepare_kernel(force=True) for m in linears)
    good = check_linears(model, "all")
    assert good["ok"] and good["shapes"] >= 3 and good["rel_err"] < 4e-3
    launcher, packed = linears[0].kernel
    linears[0].kernel = (lambda x, p: launcher(x, p) * 1.02, packed)  # a 2% error in one shape's kernel
    bad = check_linears(model, "all")
    assert not bad["ok"] and bad["rel_err"] > 1e-2


def test_a_llama_quantize_mix_gets_the_formats_export_would_write():
    """`s2conv bench --formats q4_k_m` times the per-layer formats `s2conv export --type q4_k_m` picks (q6_k in the
    layers llama-quantize gives more bits, the block fallbacks where a row is too short), each kernel checked."""
    from s2conv.bench import check_linears, format_chooser, format_counts, linear_modules, quantize_model
    from s2conv.converter.policy import ModelDims, Policy
    from s2conv.runtime.dual_ar import DualARTransformer
    from s2conv.runtime.qlinear import QuantLinear
    from test_runtime_math import TINY, random_s2_weights

    model = DualARTransformer(TINY)
    model.load_weights({k: v.to(torch.bfloat16) for k, v in random_s2_weights(TINY).items()})
    quantize_model(model, "q4_k_m", "all")
    policy = Policy(type="q4_k_m", target="all", dims=ModelDims.from_config(TINY))
    chosen = {}
    for name, parent, attr in linear_modules(model, "all"):
        q = getattr(parent, attr)
        assert isinstance(q, QuantLinear)
        assert q.fmt.name == policy.choose(name, (q.out_features, q.in_features), "bf16").format, name
        chosen[name] = q.fmt.name
    # w2 (K = 256) of the last slow layer takes q6_k, of the first q4_k: the mix, not one format
    assert chosen["layers.0.feed_forward.w2.weight"] == "q4_k" and chosen["layers.1.feed_forward.w2.weight"] == "q6_k"
    counts = format_counts(model, "all")
    assert sum(counts.values()) == len(chosen) and len(counts) >= 3
    assert check_linears(model, "all")["ok"]
    # q2_k names the plain format in the benchmark, not llama-quantize's Q2_K mix (which gives w2 Q3_K)
    w2 = ("layers.0.feed_forward.w2.weight", (128, 256))
    assert format_chooser("q2_k", "all", TINY)(*w2) == "q2_k"
    assert Policy(type="q2_k", target="all", dims=ModelDims.from_config(TINY)).choose(*w2, "bf16").format == "q3_k"
