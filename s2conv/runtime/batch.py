"""Batched decoding: several prompts of different lengths decoded together, for throughput.

Prompts are left-padded to a common length T. Each row keeps its own key-validity mask (its padded key slots are
never read) and its own RoPE positions (cache index - pad offset), so a row sees exactly what it would see decoded
alone. Rows stop at their own <|im_end|>; finished rows keep running, unread, until every row stopped.
Prefill runs the eager block code; decode steps use the fused kernels wherever `fused_decode.enable` put them
(CUDA models), with per-row RoPE rows and key offsets, else the same eager code.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from s2conv.errors import RuntimeModelError
from s2conv.runtime import fused_decode
from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.frame_loop import SPAN_STEP, capture_step, kv_positions, loop_key
from s2conv.runtime.sampling import SamplingParams, sampling_values, uses_fused

PAD_TOKEN = 0  # any id works: padded slots are masked out of every real query's attention


def left_pad(prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Prompts [11, T_b] -> (tokens [B, 11, T] left-padded with PAD_TOKEN and zero codes, pad offsets [B] long)."""
    t = max(p.shape[1] for p in prompts)
    tokens = torch.zeros(len(prompts), prompts[0].shape[0], t, dtype=torch.long, device=prompts[0].device)
    tokens[:, 0] = PAD_TOKEN
    for b, p in enumerate(prompts):  # one copy per prompt, not per token
        tokens[b, :, t - p.shape[1]:] = p
    offsets = torch.tensor([t - p.shape[1] for p in prompts], dtype=torch.long, device=prompts[0].device)
    return tokens, offsets


def row_mask(cache_pos: Tensor, offsets: Tensor, n_keys: int) -> Tensor:
    """bool [B, 1, S, n_keys]: row b's query at cache index cache_pos[s] reads key j iff offsets[b] <= j <= pos.

    A padded query (pos < offset) reads only its own slot, so it stays finite (an all-masked row would give NaN,
    and NaN values times a zero weight would leak into the real queries)."""
    keys = torch.arange(n_keys, device=cache_pos.device)
    causal = keys[None, :] <= cache_pos[:, None]                              # [S, K]
    valid = keys[None, None, :] >= offsets[:, None, None]                     # [B, 1, K]
    padded_query = cache_pos[None, :, None] < offsets[:, None, None]          # [B, S, 1]
    own = keys[None, None, :] == cache_pos[None, :, None]                     # [1, S, K]
    return ((causal[None] & valid) | (padded_query & own))[:, None]


def forward_slow_rows(model: DualARTransformer, tokens: Tensor, cache_pos: Tensor, offsets: Tensor,
                      kv_len: int) -> Tensor:
    """Slow layers over tokens [B, 11, S] written at cache indices cache_pos [S] (shared), with row b at RoPE
    positions cache_pos - offsets[b]; returns the final-normed hidden state of the last position [B, dim].

    A decode step (S = 1) of a model with fused kernels enabled runs each block as `fused_decode.decode_block`."""
    x = model.embed(tokens)
    positions = (cache_pos[None, :] - offsets[:, None]).clamp_(min=0)  # padded slots: any valid row of the table
    freqs = model.freqs_cis[positions]                                  # [B, S, D/2, 2]
    if tokens.shape[2] == 1 and fused_decode.is_enabled(model.layers[0], x):
        for layer in model.layers:
            x = fused_decode.decode_block(layer, x, freqs, cache_pos, kv_len, offsets)
    else:
        mask = row_mask(cache_pos, offsets, kv_len)
        for layer in model.layers:
            h = x + layer.attention(layer.attention_norm(x), freqs, mask, cache_pos)
            x = h + layer.feed_forward(layer.ffn_norm(h))
    return model.norm(x[:, -1])


def sample_frame_rows(model: DualARTransformer, hidden: Tensor, params: SamplingParams,
                      previous: Tensor | None, values: Tensor | None = None) -> Tensor:
    """`DualARTransformer.sample_frame` for B rows -> frame columns [B, 11]. Every row is at the same depth
    position of the fast AR (no padding there), so its blocks' own forwards serve: the fused kernels where
    `fused_decode.enable` put them, else eager. values: as in `sample_frame`."""
    return model.sample_frame(hidden, model.semantic_logits(hidden), params, None, previous, values)


class BatchLoop:
    """Static-buffer batched decode: frames [B, 11, max_frames], `done` [B]; one CUDA graph per span bucket. The
    pad offsets and the sampler's (temperature, top_p) are static buffers too (`set_offsets`, `set_params`), so the
    model keeps the loop, graphs and all, for later batches of as many rows (`batch_loop_for`)."""

    def __init__(self, model: DualARTransformer, params: SamplingParams, offsets: Tensor, max_frames: int,
                 use_graphs: bool):
        cfg, dev = model.cfg, offsets.device
        b = offsets.shape[0]
        self.model, self.use_graphs = model, use_graphs
        self.offsets = offsets.clone()
        self.values = torch.empty(2, 2, dtype=torch.float32, device=dev) if uses_fused(params, dev) else None
        self.set_params(params)
        self.pool = torch.cuda.graph_pool_handle() if use_graphs and dev.type == "cuda" else None
        self.key = None  # `batch_loop_key` after its last complete run
        self.column = torch.zeros(b, cfg.num_codebooks + 1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.previous = torch.zeros(b, params.ras_window, dtype=torch.long, device=dev)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.frames = torch.zeros(b, cfg.num_codebooks + 1, max_frames, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def set_params(self, params: SamplingParams) -> None:
        """Sample the next runs with params (of the same `sampling_key`: the graphs stay valid)."""
        self.params = params
        if self.values is not None:
            self.values.copy_(sampling_values(params))

    def set_offsets(self, offsets: Tensor) -> None:
        """The next batch's pad offsets [B]."""
        self.offsets.copy_(offsets)

    def _state(self) -> tuple[Tensor, ...]:
        return self.column, self.pos, self.index, self.previous, self.done

    def _step(self, span: int) -> None:
        m, eos = self.model, self.model.cfg.eos_token_id
        hidden = forward_slow_rows(m, self.column, self.pos, self.offsets, span)
        frame = sample_frame_rows(m, hidden, self.params, self.previous if self.params.ras_window else None,
                                  self.values)
        self.frames.index_copy_(2, self.index, frame[:, :, None])
        self.column.copy_(frame[:, :, None])
        if self.params.ras_window:
            self.previous.copy_(torch.cat([self.previous[:, 1:], frame[:, :1]], dim=1))
        self.done.logical_or_(frame[:, 0] == eos)
        self.pos.add_(1)
        self.index.add_(1)

    def _graph(self, span: int) -> torch.cuda.CUDAGraph:
        graph = self.graphs.get(span)
        if graph is None:
            graph = self.graphs[span] = capture_step(lambda: self._step(span), self._state(), self.pool)
        return graph

    def run(self, first: Tensor, start_pos: int, max_frames: int) -> int:
        """Decode after the prefill frame `first` [B, 11] (cache index start_pos); returns the frames written."""
        eos = self.model.cfg.eos_token_id
        self.frames[:, :, 0].copy_(first)
        self.column.copy_(first[:, :, None])
        self.pos.fill_(start_pos)
        self.index.fill_(1)
        self.previous.zero_()
        self.done.copy_(first[:, 0] == eos)
        watch = torch.zeros(max_frames, dtype=torch.bool, pin_memory=self.use_graphs)
        events: dict[int, torch.cuda.Event] = {}

        def all_done(j: int) -> bool:  # after frame j; waits for that frame only
            if self.use_graphs:
                events.pop(j).synchronize()
            return bool(watch[j])

        watch[0] = bool(self.done.all())
        if watch[0]:
            return 1
        for k in range(1, max_frames):
            span = min(self.model.max_seq, -(-(start_pos + k) // SPAN_STEP) * SPAN_STEP)
            if self.use_graphs:
                self._graph(span).replay()
            else:
                self._step(span)
            watch[k:k + 1].copy_(self.done.all()[None], non_blocking=self.use_graphs)
            if self.use_graphs:
                events[k] = torch.cuda.Event()
                events[k].record()
            if k >= 2 and all_done(k - 1):  # frame k is in flight while the host looks at k - 1
                return k
        return max_frames


def prefill_batch(model: DualARTransformer, tokens: Tensor, offsets: Tensor, max_new_frames: int,
                  params: SamplingParams) -> Tensor:
    """Caches for exactly B rows (grown in `frame_loop.KV_STEP` steps, as `generate_frames` does, so that later
    batches of nearby lengths keep them and the kept loop's graphs), run the left-padded prompt tokens [B, 11, T]
    (pad offsets [B]) and sample the first frame [B, 11] (no RAS window)."""
    b, t = tokens.shape[0], tokens.shape[2]
    model.setup_caches(b, kv_positions(t, max_new_frames))
    hidden = forward_slow_rows(model, tokens, torch.arange(t, device=tokens.device), offsets, t)
    return sample_frame_rows(model, hidden, params, None)


@torch.inference_mode()
def generate_frames_batch(model: DualARTransformer, prompts: list[Tensor], max_new_frames: int,
                          params: SamplingParams = SamplingParams(), seed: int = 0,
                          use_graphs: bool | None = None) -> list[Tensor]:
    """Codes [num_codebooks, n_b] for each prompt [1 + num_codebooks, T_b], decoded as one batch.

    Row b stops at its first <|im_end|> (dropped) or after max_new_frames frames. Sampling draws from the device's
    default generator seeded with `seed` (one stream for the whole batch, so sampled rows differ from a batch-1
    run; greedy rows equal `generate_frames` of that prompt alone). The caches hold exactly B rows; the loop and
    its CUDA graphs stay with the model for the next batch of B prompts (`batch_loop_for`)."""
    cfg = model.cfg
    if not prompts:
        raise RuntimeModelError("generate_frames_batch needs at least one prompt, got 0")
    for i, p in enumerate(prompts):
        if p.ndim != 2 or p.shape[0] != cfg.num_codebooks + 1 or p.shape[1] < 1:
            raise RuntimeModelError(f"prompt {i} shape {tuple(p.shape)}, expected ({cfg.num_codebooks + 1}, T >= 1)")
    if max_new_frames < 1:
        raise RuntimeModelError(f"max_new_frames must be >= 1, got {max_new_frames}")
    tokens, offsets = left_pad(prompts)
    b, t = tokens.shape[0], tokens.shape[2]
    if t + max_new_frames > cfg.max_seq_len:
        raise RuntimeModelError(f"longest prompt {t} + max_new_frames {max_new_frames} exceeds max_seq_len "
                                f"{cfg.max_seq_len}")
    device = tokens.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # its generator, its streams for capture
            return generate_frames_batch(model, prompts, max_new_frames, params, seed, use_graphs)
    use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
    (torch.cuda.manual_seed if device.type == "cuda" else torch.manual_seed)(seed)
    first = prefill_batch(model, tokens, offsets, max_new_frames, params)
    loop = batch_loop_for(model, params, offsets, max_new_frames, use_graphs)
    n = loop.run(first, t, max_new_frames)
    loop.key = batch_loop_key(model, params, b, use_graphs)
    frames = loop.frames[:, :, :n]
    is_eos = frames[:, 0] == cfg.eos_token_id                                  # [B, n]
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), n).tolist()
    return [frames[i, 1:, :lengths[i]].clone() for i in range(b)]


def batch_loop_key(model: DualARTransformer, params: SamplingParams, rows: int, use_graphs: bool) -> tuple:
    """What a BatchLoop's graphs were captured against: its rows and `frame_loop.loop_key`."""
    return rows, loop_key(model, params, use_graphs)


def batch_loop_for(model: DualARTransformer, params: SamplingParams, offsets: Tensor, max_frames: int,
                   use_graphs: bool) -> BatchLoop:
    """The model's BatchLoop for B = len(offsets) rows, kept between calls with its graphs (as `frame_loop_for`
    keeps the batch-1 loop): a new one when `batch_loop_key` differs from the key after its last complete run or
    it holds fewer than max_frames frames, or every call with S2CONV_FRAME_LOOP_CACHE=0. A kept loop takes the
    batch's pad offsets and sampling values."""
    loop = model.batch_loop
    if (loop is None or loop.frames.shape[2] < max_frames or os.environ.get("S2CONV_FRAME_LOOP_CACHE", "1") == "0"
            or loop.key != batch_loop_key(model, params, offsets.shape[0], use_graphs)):
        model.batch_loop = None
        loop = model.batch_loop = BatchLoop(model, params, offsets, max_frames, use_graphs)
    loop.set_offsets(offsets)
    loop.set_params(params)
    return loop
