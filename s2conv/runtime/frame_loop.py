"""The decode loop with static buffers, replayed as one CUDA graph per frame on GPUs.

A frame (slow step, semantic head, sampling with RAS, the fast AR's depth loop and its sampling) reads and writes
only preallocated buffers: the previous frame column, the position, the RAS window and the output frames. Replaying
the captured graph N times therefore decodes N frames with no host work in between; the host only watches for
<|im_end|>, one frame behind the GPU, through a pinned copy. The attention span is bucketed (a multiple of
`SPAN_STEP` positions), with one graph per bucket, so early frames do not read the whole KV cache.
The loop and its graphs stay with the model between `generate_frames` calls (`frame_loop_for`): a pipeline that
speaks text in several batches captures each span's graph once, not once per batch, and the KV cache grows in
steps of `KV_STEP` positions so that the next batch's longer prompt rarely reallocates it (which would make the
graphs stale).
On the CPU the same step runs eagerly, so the loop logic is tested without a GPU.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from s2conv.runtime.dual_ar import DualARTransformer, check_generation
from s2conv.runtime.sampling import SamplingParams, sampling_values, uses_fused

SPAN_STEP = 256
KV_STEP = 1024  # KV cache positions are allocated in these steps by `generate_frames` (about 150 MB for S2 Pro)


def capture_step(step, state: tuple[Tensor, ...], pool=None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step()`. Two warm-up calls run first on a side stream (allocator, cuBLAS handles, Triton
    compilation), each followed by restoring the `state` tensors the step advances; the KV slots they wrote are
    rewritten with the same values on replay. The device generator's state is restored too, so the random draws
    of a decode do not depend on whether its graphs were captured in this call or an earlier one. pool: a memory
    pool shared with other graphs of steps that never run at the same time (`torch.cuda.graph_pool_handle`)."""
    saved = [t.clone() for t in state]
    rng = torch.cuda.get_rng_state()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
    finally:
        torch.cuda.set_rng_state(rng)
    return graph


class FrameLoop:
    """Decodes frames into `frames` [1 + num_codebooks, max_frames] starting after a prefilled prompt."""

    def __init__(self, model: DualARTransformer, params: SamplingParams, max_frames: int, use_graphs: bool):
        cfg, dev = model.cfg, model.norm.weight.device
        self.model, self.use_graphs = model, use_graphs
        # the fused sampler reads (temperature, top_p) from here when each step runs: a kept loop follows new
        # values without new graphs (`sampling_key`); None where sampling runs eagerly (those values are in the key)
        self.values = torch.empty(2, 2, dtype=torch.float32, device=dev) if uses_fused(params, dev) else None
        self.set_params(params)
        self.column = torch.zeros(1, cfg.num_codebooks + 1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)  # next free column of `frames`
        self.previous = torch.zeros(1, params.ras_window, dtype=torch.long, device=dev)
        self.frames = torch.zeros(cfg.num_codebooks + 1, max_frames, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # one memory pool for all span graphs: a step leaves nothing alive outside the static buffers above, and
        # steps run one after another, so they can share their temporaries (kept graphs hold one pool, not one each)
        self.pool = torch.cuda.graph_pool_handle() if use_graphs and dev.type == "cuda" else None
        self.key = None  # `loop_key` after its last complete run: what its graphs were captured against

    def set_params(self, params: SamplingParams) -> None:
        """Sample the next runs with params (of the same `sampling_key`: the graphs stay valid)."""
        self.params = params
        if self.values is not None:
            self.values.copy_(sampling_values(params))  # stream-ordered before the next replay

    def _step(self, span: int) -> None:
        """One frame from the static buffers into the static buffers (the body of the graph)."""
        m = self.model
        frame = m.decode_one_frame(self.column, self.pos, self.params, None,
                                   self.previous if self.params.ras_window else None, kv_len=span,
                                   values=self.values)  # [1, 11]
        ops = m.__dict__.get("_frame_ops")  # `fused_decode.enable`: the steps below in one launch
        if ops is not None and (frame.is_cuda or m.__dict__["_frame_ops_force"]):
            ops.frame_finish(frame, self.frames, self.index, self.column,
                             self.previous if self.params.ras_window else None, self.pos)
            return
        self.frames.index_copy_(1, self.index, frame.T)
        self.column.copy_(frame[:, :, None])
        if self.params.ras_window:
            self.previous.copy_(torch.cat([self.previous[:, 1:], frame[:, :1]], dim=1))
        self.pos.add_(1)
        self.index.add_(1)

    def _graph(self, span: int) -> torch.cuda.CUDAGraph:
        graph = self.graphs.get(span)
        if graph is None:
            graph = self.graphs[span] = capture_step(lambda: self._step(span),
                                                     (self.column, self.pos, self.index, self.previous), self.pool)
        return graph

    def _run(self, first: Tensor, start_pos: int, max_frames: int, max_seq: int, on_frame) -> Tensor:
        eos = self.model.cfg.eos_token_id
        self.frames[:, :1].copy_(first.T)
        self.column.copy_(first[:, :, None])
        self.pos.fill_(start_pos)
        self.index.fill_(1)
        self.previous.zero_()
        if int(first[0, 0]) == eos:
            return self.frames[:, :0]
        watch = torch.empty(max_frames, dtype=torch.long, pin_memory=self.use_graphs)
        events: dict[int, torch.cuda.Event] = {}

        def is_eos(j: int) -> bool:  # waits for frame j only
            if self.use_graphs:
                events.pop(j).synchronize()
            return int(watch[j]) == eos

        for k in range(1, max_frames):
            span = min(max_seq, -(-(start_pos + k) // SPAN_STEP) * SPAN_STEP)
            if self.use_graphs:
                self._graph(span).replay()
            else:
                self._step(span)
            watch[k:k + 1].copy_(self.frames[0, k:k + 1], non_blocking=self.use_graphs)
            if self.use_graphs:
                events[k] = torch.cuda.Event()
                events[k].record()
            if k >= 2 and is_eos(k - 1):  # frame k is already in flight while the host looks at k - 1
                return self.frames[:, :k - 1]
            if on_frame is not None and k >= 2:
                on_frame(k - 1)
        if max_frames >= 2 and is_eos(max_frames - 1):
            return self.frames[:, :max_frames - 1]
        return self.frames[:, :max_frames]

    def run(self, first: Tensor, start_pos: int, max_frames: int, max_seq: int, on_frame=None) -> Tensor:
        """Decode after the prompt: `first` [1, 11] is the frame sampled from the prefill at position start_pos.

        Returns the frames [1 + num_codebooks, n] up to (excluding) the first <|im_end|> frame. `on_frame(n)`, if
        given, is called as frames are confirmed (n = frames kept so far), last with the final count."""
        frames = self._run(first, start_pos, max_frames, max_seq, on_frame)
        if on_frame is not None:
            on_frame(frames.shape[1])
        return frames


@torch.inference_mode()
def generate_frames(model: DualARTransformer, prompt: Tensor, max_new_frames: int,
                    params: SamplingParams = SamplingParams(), seed: int = 0,
                    use_graphs: bool | None = None, on_frame=None) -> Tensor:
    """Codes [num_codebooks, n_frames] for one prompt [1 + num_codebooks, T], sampling from the device's default
    generator seeded with `seed` (graph-safe). Stops at <|im_end|> (dropped) or after max_new_frames frames."""
    cfg = model.cfg
    t = check_generation(cfg, prompt, max_new_frames)
    device = prompt.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # its generator, its streams for capture
            return generate_frames(model, prompt, max_new_frames, params, seed, use_graphs, on_frame)
    use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    model.setup_caches(1, kv_positions(t, max_new_frames))
    hidden, logits = model.prefill(prompt[None])
    first = model.sample_frame(hidden, logits, params, None)  # the prefill frame has no RAS window
    loop = frame_loop_for(model, params, max_new_frames, use_graphs)
    codes = loop.run(first, t, max_new_frames, model.max_seq, on_frame)[1:].clone()
    loop.key = loop_key(model, params, use_graphs)  # after the run: joined weight copies made during it count
    return codes


def kv_positions(prompt_len: int, max_new_frames: int) -> int:
    """KV cache positions to allocate for a generation: what it needs, rounded up to whole `KV_STEP`s."""
    return -(-(prompt_len + max_new_frames) // KV_STEP) * KV_STEP


def sampling_key(params: SamplingParams, device: torch.device) -> tuple:
    """What of the sampling settings a FrameLoop's graphs hold: with the fused sampler, top_k and the RAS window
    (its (temperature, top_p) pairs are read from `FrameLoop.values` at run time); otherwise all of them."""
    if uses_fused(params, device):
        return "fused", params.top_k, params.ras_window
    return "eager", params


def loop_key(model: DualARTransformer, params: SamplingParams, use_graphs: bool) -> tuple:
    """What a FrameLoop's graphs were captured against: the sampling settings they hold (`sampling_key`), the KV
    caches' allocation (`cache_version`), and the address, dtype and shape of every tensor the model holds
    (parameters with their versions, buffers, and tensors kept as attributes: the kernels' packed weights, the fused
    decode's slots and joined copies), so that replaced or reloaded weights get new graphs. Tensors that decoding
    writes (caches, slots) count without a version. Also every S2CONV_* setting: the kernels read them at launch,
    so a graph holds the choices made at its capture."""
    found = []

    def add(v, version: bool) -> None:
        if isinstance(v, torch.Tensor):
            kept = v._version if version and not v.is_inference() else 0
            found.append((v.data_ptr(), v.dtype, tuple(v.shape), kept))
        elif isinstance(v, (tuple, list)):
            for e in v:
                add(e, False)
        elif isinstance(v, dict):
            for e in v.values():
                add(e, False)

    for m in model.modules():
        for p in m._parameters.values():
            add(p, True)
        for b in m._buffers.values():
            add(b, False)
        for name, v in vars(m).items():
            if name not in ("_parameters", "_buffers", "_modules", "frame_loop", "batch_loop"):
                add(v, False)
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("S2CONV_")))
    return (sampling_key(params, model.norm.weight.device), use_graphs, model.cache_version, settings,
            tuple(found))


def frame_loop_for(model: DualARTransformer, params: SamplingParams, max_frames: int, use_graphs: bool) -> FrameLoop:
    """The model's FrameLoop for these settings, kept between calls with its captured graphs. A new one (the old
    one and its graphs released first) when `loop_key` differs from the key after its last complete run (another
    top_k or RAS window, or any other sampling setting where sampling runs eagerly; reallocated KV caches,
    replaced weights, changed S2CONV_* settings) or when it holds fewer than max_frames frames. A kept loop takes
    the call's temperature and top_p through `FrameLoop.set_params`. S2CONV_FRAME_LOOP_CACHE=0 makes a new one
    every call. Weights changed in place through `.data` without a version bump are not seen: set
    `model.frame_loop = None` after such surgery."""
    loop = model.frame_loop
    if (loop is None or loop.frames.shape[1] < max_frames or os.environ.get("S2CONV_FRAME_LOOP_CACHE", "1") == "0"
            or loop.key != loop_key(model, params, use_graphs)):
        model.frame_loop = None
        loop = model.frame_loop = FrameLoop(model, params, max_frames, use_graphs)
    loop.set_params(params)
    return loop
