"""The frame kernels (`kernels/frame.py`) give exactly what the eager steps they replace give: a decode column's
input embedding (with eager CUDA's rounding), RAS's main token, the frame loop's bookkeeping; and a model with them
installed decodes the same frames (CPU: triton's interpreter, small shapes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.runtime import fused_decode  # noqa: E402
from s2conv.runtime.dual_ar import DualARTransformer  # noqa: E402
from s2conv.runtime.frame_loop import generate_frames  # noqa: E402
from s2conv.runtime.kernels import frame  # noqa: E402
from s2conv.runtime.sampling import SamplingParams, ras_select  # noqa: E402
from test_runtime_math import TINY, _force_eos_at, random_prompt, random_s2_weights  # noqa: E402


def _model() -> DualARTransformer:
    return DualARTransformer.from_weights(TINY, random_s2_weights(TINY), torch.bfloat16, device=DEVICE)


def _columns(rows: int, seed: int) -> torch.Tensor:
    """[rows, 11, 1]: semantic main tokens with random codes, and a text token and <|im_end|> among them."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY
    tokens = torch.randint(0, cfg.codebook_size, (rows, cfg.num_codebooks + 1, 1), generator=g)
    tokens[:, 0] = torch.randint(cfg.semantic_begin_id, cfg.semantic_end_id + 1, (rows, 1), generator=g)
    tokens[0, 0], tokens[1, 0] = 17, cfg.eos_token_id  # not semantic: no codebook rows, no scaling
    tokens[2, 0], tokens[3, 0] = cfg.semantic_begin_id, cfg.semantic_end_id  # the range's ends
    return tokens.to(DEVICE)


def _embed_as_cuda_does(model: DualARTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """`embed` with eager CUDA's arithmetic spelled out (it divides by a Python float as a multiply by the fp32
    reciprocal; the CPU divides): the reference for the kernel on either device."""
    cfg = model.cfg
    ids, codes = tokens[:, 0], tokens[:, 1:]
    offsets = torch.arange(cfg.num_codebooks, device=tokens.device)[None, :, None] * cfg.codebook_size
    vq = model.codebook_embeddings.weight[codes + offsets].float().sum(dim=1).to(torch.bfloat16)
    semantic = ((ids >= cfg.semantic_begin_id) & (ids <= cfg.semantic_end_id))[..., None]
    x = (model.embeddings.weight[ids].float() + torch.where(semantic, vq, 0).float()).to(torch.bfloat16)
    inv = float(np.float32(1.0) / np.float32(math.sqrt(cfg.num_codebooks + 1)))
    return torch.where(semantic, (x.float() * inv).to(torch.bfloat16), x)


@pytest.mark.parametrize("rows", [4, 7])
def test_embed_column_equals_the_eager_embedding(rows):
    model, cfg = _model(), TINY
    tokens = _columns(rows, seed=rows)
    got = frame.embed_column(tokens, model.embeddings.weight, model.codebook_embeddings.weight,
                             cfg.semantic_begin_id, cfg.semantic_end_id, cfg.codebook_size, True)
    assert got.shape == (rows, 1, cfg.dim) and got.dtype == torch.bfloat16
    assert torch.equal(got, _embed_as_cuda_does(model, tokens))
    eager = model.embed(tokens)
    if DEVICE == "cuda":
        assert torch.equal(got, eager)
    else:  # the CPU divides: at most one bf16 step apart, only where scaled
        assert torch.equal(got[:2], eager[:2])
        torch.testing.assert_close(got, eager, rtol=2 ** -7, atol=0)
    unscaled = frame.embed_column(tokens, model.embeddings.weight, model.codebook_embeddings.weight,
                                  cfg.semantic_begin_id, cfg.semantic_end_id, cfg.codebook_size, False)
    assert torch.equal(unscaled[:2], got[:2]) and not torch.equal(unscaled[2:], got[2:])


def test_embed_column_rejects_a_prompt():
    model, cfg = _model(), TINY
    with pytest.raises(Exception, match="embed_column: tokens must be int64"):
        frame.embed_column(_columns(4, 0).repeat(1, 1, 2), model.embeddings.weight,
                           model.codebook_embeddings.weight, cfg.semantic_begin_id, cfg.semantic_end_id,
                           cfg.codebook_size, True)


@pytest.mark.parametrize("window", [1, 5, 16, 20])
def test_ras_main_equals_token_ids_and_ras_select(window):
    model, cfg = _model(), TINY
    g = torch.Generator().manual_seed(window)
    rows, n_sem = 12, cfg.semantic_end_id - cfg.semantic_begin_id + 1
    normal = torch.randint(0, n_sem + 1, (rows,), generator=g)
    high = torch.randint(0, n_sem + 1, (rows,), generator=g)
    normal[0] = n_sem  # <|im_end|>: never replaced, even when the window holds it
    previous = torch.randint(cfg.semantic_begin_id, cfg.semantic_begin_id + 4, (rows, window), generator=g)
    previous[0, -1] = cfg.eos_token_id
    previous[1:6, 0] = normal[1:6] + cfg.semantic_begin_id  # repeats at the window's oldest slot
    token, alt = model.semantic_index_to_token(normal), model.semantic_index_to_token(high)
    want = ras_select(token, alt, previous, (token >= cfg.semantic_begin_id) & (token <= cfg.semantic_end_id))
    got = frame.ras_main(normal.to(DEVICE), high.to(DEVICE), previous.to(DEVICE), n_sem, cfg.eos_token_id,
                         cfg.semantic_begin_id, cfg.semantic_end_id)
    assert torch.equal(got.cpu(), want)
    assert (want != token).any()  # the case RAS exists for happened


@pytest.mark.parametrize("window", [0, 3])
def test_frame_finish_does_the_frame_loops_bookkeeping(window):
    g = torch.Generator().manual_seed(window)
    frame_ = torch.randint(0, 99, (1, 11), generator=g).to(DEVICE)
    frames = torch.randint(0, 99, (11, 9), generator=g).to(DEVICE)
    column = torch.zeros(1, 11, 1, dtype=torch.long, device=DEVICE)
    previous = torch.randint(0, 99, (1, window), generator=g).to(DEVICE) if window else None
    index, pos = torch.tensor([4], device=DEVICE), torch.tensor([37], device=DEVICE)
    want_frames = frames.clone()
    want_frames[:, 4] = frame_[0]
    want_previous = None if previous is None else torch.cat([previous[:, 1:], frame_[:, :1]], dim=1)
    frame.frame_finish(frame_, frames, index, column, previous, pos)
    assert torch.equal(frames, want_frames) and torch.equal(column[:, :, 0], frame_)
    assert int(index) == 5 and int(pos) == 38
    assert previous is None or torch.equal(previous, want_previous)


def test_a_model_with_frame_kernels_decodes_the_same_frames(monkeypatch):
    """Frame loop with RAS, the frame kernels installed as `fused_decode.enable` installs them (forced: on the CPU
    RAS's choice and the bookkeeping run the kernels, the embedding stays eager; the blocks stay eager, for
    speed under the interpreter), against the same model without them."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, ras_window=4)
    prompt = random_prompt(TINY, 12, seed=3).to(DEVICE)
    runs = []
    for frame_ops in ("1", "0"):
        monkeypatch.setenv("S2CONV_FRAME_OPS", frame_ops)
        model = _model()
        fused_decode._install_frame_ops(model, force=True)
        assert ("_frame_ops" in model.__dict__) == (frame_ops == "1")
        _force_eos_at(model, 9)
        runs.append(generate_frames(model, prompt, 12, params, seed=5, use_graphs=False))  # the patch is eager
    assert runs[0].shape[1] == 8 and torch.equal(runs[0], runs[1])
    fused_decode.disable(model)
    assert "embed" not in model.__dict__ and "sample_main" not in model.__dict__
