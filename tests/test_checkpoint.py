"""Synthetic checkpoints, the checkpoint reader and its validation errors."""
import json
import math
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2conv.checkpoint import PRESETS, make_checkpoint, open_checkpoint
from s2conv.codec_schema import codec_tensor_shapes
from s2conv.errors import CheckpointError
from s2conv.schema import hf_to_model_name, model_tensor_shapes

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_shard(path: Path, shard: str, edit) -> None:
    """Apply edit(tensors dict) to one shard, rewrite it and keep the index's weight_map in step."""
    tensors = load_file(path / shard)
    edit(tensors)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    wm = {k: v for k, v in index["weight_map"].items() if v != shard}
    wm.update({k: shard for k in tensors})
    index["weight_map"] = wm
    index_file.write_text(json.dumps(index))


def problems_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# generation + reading
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_generated_checkpoint_reads_back_with_schema_names_shapes_and_dtypes(preset, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint if preset == "tiny" else make_checkpoint(preset, tmp_path / preset)
    ckpt = open_checkpoint(path)
    p = PRESETS[preset]
    assert ckpt.config == p.config and ckpt.codec_config == p.codec
    expected = {hf_to_model_name(n): s for n, s in model_tensor_shapes(p.config).items()}
    assert ckpt.model_names() == list(expected)
    for name, shape in expected.items():
        assert ckpt.model_shape(name) == shape and ckpt.model_dtype(name) == torch.bfloat16
    assert tuple(ckpt.model_tensor("fast_output.weight").shape) == (p.config.codebook_size, p.config.fast_dim)
    codec = codec_tensor_shapes(p.codec)
    assert ckpt.codec_names() == list(codec)
    assert all(ckpt.codec_tensor(n).dtype == torch.float32 and ckpt.codec_shape(n) == s for n, s in codec.items())
    counts = ckpt.n_params()
    assert counts["codec"] == sum(math.prod(s) for s in codec.values())
    assert counts["slow_ar"] + counts["fast_ar"] + counts["embeddings"] == sum(map(math.prod, expected.values()))
    assert counts["embeddings"] == (p.config.vocab_size * p.config.dim
                                    + p.config.codebook_size * (p.config.num_codebooks * p.config.dim
                                                                + p.config.fast_dim))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    model_total = counts["slow_ar"] + counts["fast_ar"] + counts["embeddings"]
    assert index["metadata"] == {"total_parameters": model_total, "total_size": 2 * model_total}
    # the fast AR lives in the last shard, as in the release; both shards hold slow-AR tensors
    assert {v for k, v in index["weight_map"].items() if k.startswith("audio_decoder.")} == {SHARD2}
    assert {v for k, v in index["weight_map"].items() if k.startswith("text_model.")} == {SHARD1, SHARD2}
    assert ckpt.check_values() == len(expected) + len(codec)


def test_tiny_preset_fits_kquant_rows_and_documents_its_frame_length():
    cfg, cc = PRESETS["tiny"].config, PRESETS["tiny"].codec
    inputs = {cfg.dim, cfg.q_dim, cfg.intermediate_size, cfg.fast_dim, cfg.fast_q_dim, cfg.fast_intermediate_size}
    assert all(d % 256 == 0 for d in inputs)
    assert cc.frame_length == 512 and cc.n_codebooks == cfg.num_codebooks == 10
    assert cfg.codebook_size == cc.semantic_codebook_size


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tiny_checkpoint, tmp_path):
    again = make_checkpoint("tiny", tmp_path / "again", seed=0)
    other = make_checkpoint("tiny", tmp_path / "other", seed=1)
    files = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for f in files:
        assert (tiny_checkpoint / f).read_bytes() == (again / f).read_bytes(), f
    for f in (SHARD1, SHARD2, "codec.pth"):
        assert (tiny_checkpoint / f).read_bytes() != (other / f).read_bytes(), f
    assert (tiny_checkpoint / "config.json").read_bytes() == (other / "config.json").read_bytes()
    assert open_checkpoint(tiny_checkpoint).content_hash() != open_checkpoint(other).content_hash()
    assert open_checkpoint(tiny_checkpoint).content_hash() == open_checkpoint(again).content_hash()


def test_weights_look_trained_heavy_tails_outliers_positive_scales(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    w = ckpt.model_tensor("layers.0.feed_forward.w1.weight").float()  # [512, 256]
    col_rms = w.pow(2).mean(0).sqrt()
    typical = col_rms.median()
    assert 0.6 < typical / 256 ** -0.5 < 1.4  # std ~ fan_in^-0.5
    assert (col_rms > 3 * typical).sum() >= 1  # outlier input channels
    inliers = w[:, col_rms < 2 * typical].flatten()
    kurtosis = ((inliers - inliers.mean()) ** 4).mean() / inliers.var() ** 2
    assert kurtosis > 4.5  # Gaussian would be 3
    norm = ckpt.model_tensor("layers.1.attention_norm.weight").float()
    assert (norm > 0).all() and 0.8 < norm.mean() < 1.3 and norm.std() > 0.05
    alphas = [ckpt.codec_tensor(n) for n in ckpt.codec_names() if n.endswith(".alpha")]
    gs = [ckpt.codec_tensor(n) for n in ckpt.codec_names() if n.endswith(("original0", "weight_g"))]
    assert len(gs) == 80 and all((t > 0).all() for t in alphas + gs)


# ---------------------------------------------------------------------------------------------------------------
# validation errors: one line, every problem
# ---------------------------------------------------------------------------------------------------------------


def test_missing_tensor(ckpt_copy):
    edit_shard(ckpt_copy, SHARD1, lambda t: t.pop("text_model.model.layers.0.attention.wo.weight"))
    msg = problems_of(ckpt_copy)
    assert "1 problem: missing text_model.model.layers.0.attention.wo.weight" in msg


def test_unexpected_tensor(ckpt_copy):
    edit_shard(ckpt_copy, SHARD2, lambda t: t.update({"audio_decoder.extra.weight": torch.zeros(4)}))
    assert "unexpected tensor audio_decoder.extra.weight" in problems_of(ckpt_copy)


def test_wrong_shape_and_int_dtype_are_reported_together(ckpt_copy):
    name = "text_model.model.layers.1.feed_forward.w2.weight"

    def edit(t):
        t[name] = t[name].T.contiguous()
        t["text_model.model.norm.weight"] = torch.ones(256, dtype=torch.int32)
    shard = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())["weight_map"][name]
    assert shard == json.loads((ckpt_copy / "model.safetensors.index.json").read_text())["weight_map"][
        "text_model.model.norm.weight"]
    edit_shard(ckpt_copy, shard, edit)
    msg = problems_of(ckpt_copy)
    assert "2 problems" in msg
    assert f"wrong shape {name}: [512, 256], expected [256, 512]" in msg
    assert "non-float dtype text_model.model.norm.weight: I32" in msg


def test_nan_and_inf_found_by_check_values_not_by_open(ckpt_copy):
    def edit(t):
        t["text_model.model.embeddings.weight"][3, 7] = float("nan")
        t["text_model.model.layers.0.attention.wqkv.weight"][0, :2] = float("inf")
    edit_shard(ckpt_copy, SHARD1, edit)
    ckpt = open_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError) as e:
        ckpt.check_values()
    assert "NaN in model tensor embeddings.weight (1 values)" in str(e.value)
    assert "Inf in model tensor layers.0.attention.wqkv.weight (2 values)" in str(e.value)


def test_nan_in_codec_is_found(ckpt_copy):
    sd = torch.load(ckpt_copy / "codec.pth", weights_only=True)
    sd["decoder.model.0.conv.bias"][5] = float("nan")
    torch.save(sd, ckpt_copy / "codec.pth")
    with pytest.raises(CheckpointError, match="NaN in codec tensor decoder.model.0.conv.bias"):
        open_checkpoint(ckpt_copy).check_values()


def test_missing_shard(ckpt_copy):
    (ckpt_copy / SHARD2).unlink()
    msg = problems_of(ckpt_copy)
    assert f"missing shard {SHARD2}" in msg and "missing audio_decoder" not in msg


def test_truncated_safetensors_data(ckpt_copy):
    data = (ckpt_copy / SHARD1).read_bytes()
    (ckpt_copy / SHARD1).write_bytes(data[:-100])
    assert f"{SHARD1}: truncated or padded safetensors file" in problems_of(ckpt_copy)


def test_truncated_safetensors_header(ckpt_copy):
    (ckpt_copy / SHARD2).write_bytes(struct.pack("<Q", 5000) + b'{"a":')
    assert f"{SHARD2}: truncated safetensors header" in problems_of(ckpt_copy)


def test_single_file_checkpoint_without_index_is_accepted(ckpt_copy):
    merged = {**load_file(ckpt_copy / SHARD1), **load_file(ckpt_copy / SHARD2)}
    for f in (SHARD1, SHARD2, "model.safetensors.index.json"):
        (ckpt_copy / f).unlink()
    save_file(merged, ckpt_copy / "model.safetensors")
    ckpt = open_checkpoint(ckpt_copy)
    assert len(ckpt.model_names()) == len(model_tensor_shapes(PRESETS["tiny"].config))


@pytest.mark.parametrize("bad", ["/nonexistent/s2-pro", "relative/../../nope/at/all"])
def test_bad_path(bad):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(bad)


def test_missing_config_and_bad_config(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type"):
        open_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        open_checkpoint(ckpt_copy)


class _Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_codec_pickle_is_refused_and_not_executed(ckpt_copy, tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"encoder.block.0.conv.bias": torch.zeros(16), "evil": _Exploit(marker)}
    if container == "torch_zip":
        torch.save(payload, ckpt_copy / "codec.pth")
    else:
        (ckpt_copy / "codec.pth").write_bytes(pickle.dumps(payload))
    msg = problems_of(ckpt_copy)
    assert "codec.pth: cannot load safely as weights" in msg
    assert not marker.exists()


def test_codec_wrapped_with_generator_prefix_and_discriminator_loads(ckpt_copy):
    sd = torch.load(ckpt_copy / "codec.pth", weights_only=True)
    wrapped = {f"generator.{k}": v for k, v in sd.items()}
    wrapped["discriminator.conv.weight"] = torch.zeros(3)
    torch.save({"state_dict": wrapped}, ckpt_copy / "codec.pth")
    ckpt = open_checkpoint(ckpt_copy)
    assert ckpt.codec_names() == list(codec_tensor_shapes(PRESETS["tiny"].codec))
    assert not any("freqs_cis" in n or "causal_mask" in n for n in ckpt.codec_names())


def test_codec_missing_and_misshapen_tensors(ckpt_copy):
    sd = torch.load(ckpt_copy / "codec.pth", weights_only=True)
    del sd["quantizer.quantizer.quantizers.8.codebook.weight"]
    sd["decoder.model.2.block.1.conv.parametrizations.weight.original0"] = torch.ones(3, 1, 1)
    torch.save(sd, ckpt_copy / "codec.pth")
    msg = problems_of(ckpt_copy)
    assert "missing codec tensor quantizer.quantizer.quantizers.8.codebook.weight" in msg
    assert "wrong shape codec tensor decoder.model.2.block.1.conv.parametrizations.weight.original0: [3, 1, 1]" in msg


def test_missing_tokenizer_and_codec_are_listed(ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    (ckpt_copy / "codec.pth").unlink()
    msg = problems_of(ckpt_copy)
    assert "2 problems" in msg and "missing tokenizer.json" in msg and "missing codec.pth" in msg


def test_many_problems_are_summarised_on_one_line(ckpt_copy):
    for shard in (SHARD1, SHARD2):
        edit_shard(ckpt_copy, shard, lambda t: [t.pop(k) for k in list(t)[1:]])
    msg = problems_of(ckpt_copy)
    assert msg.count("missing ") == 12 and "29 problems" in msg and "; ... and 17 more" in msg


@pytest.mark.slow
def test_full_preset_streams_the_real_release_layout(tmp_path):
    """Generate the 4.56 B + 0.39 B parameter checkpoint in a child process; check names, shapes and peak RSS."""
    import subprocess
    import sys
    out = tmp_path / "full"
    code = ("import resource, sys; from s2conv.checkpoint import make_checkpoint; "
            f"make_checkpoint('full', {str(out)!r}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kib = int(p.stdout.split()[-1])
    assert peak_kib < 4 * 1024 * 1024, f"peak RSS {peak_kib / 1024 ** 2:.2f} GiB"
    fixtures = Path(__file__).parent / "fixtures"
    model_table = json.loads((fixtures / "s2-pro-model-tensors.json").read_text())
    codec_table = json.loads((fixtures / "s2-pro-codec-tensors.json").read_text())
    ckpt = open_checkpoint(out)
    assert ckpt.model_names() == [hf_to_model_name(n) for n in model_table]
    assert all(ckpt.model_shape(hf_to_model_name(n)) == tuple(s) for n, s in model_table.items())
    assert ckpt.codec_names() == list(codec_tensor_shapes(ckpt.codec_config))
    assert {n: ckpt.codec_shape(n) for n in ckpt.codec_names()} == {k: tuple(v) for k, v in codec_table.items()}
    counts = ckpt.n_params()
    assert counts["slow_ar"] + counts["fast_ar"] + counts["embeddings"] == 4_561_852_416
    assert counts["codec"] == 391_430_530
    assert ckpt.config == PRESETS["full"].config


def test_repo_id_resolves_through_the_hub_cache_first(tiny_checkpoint, monkeypatch):
    import huggingface_hub
    calls = []

    def fake(repo_id, local_files_only=False, **kw):
        calls.append((repo_id, local_files_only))
        return str(tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert open_checkpoint("fishaudio/s2-pro").path == tiny_checkpoint.resolve()
    assert calls == [("fishaudio/s2-pro", True)]


def test_repo_id_download_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def fail(repo_id, local_files_only=False, **kw):
        raise (FileNotFoundError("not cached") if local_files_only else ConnectionError("no network\nmore"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=r"fishaudio/s2-pro: .*Hugging Face Hub failed \(ConnectionError: "
                                              r"no network\)$"):
        open_checkpoint("fishaudio/s2-pro")
