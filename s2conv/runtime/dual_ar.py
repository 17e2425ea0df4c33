"""The S2 Pro dual-AR transformer: a Qwen3-style slow AR over frames and a 4-layer fast AR over codebooks.

One decode step (`decode_one_frame`) = slow step at position T -> semantic-masked main token (with RAS) -> fast AR
over the num_codebooks depth positions -> a frame column [main_token, c0, ..., c9]. The per-frame path has no host
synchronisation and no data-dependent Python branching, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.errors import RuntimeModelError
from s2conv.runtime.layers import KVCache, RMSNorm, TransformerBlock, causal_mask
from s2conv.runtime.rope import precompute_freqs_cis
from s2conv.runtime.sampling import SamplingParams, draw_noise, ras_select, sample, sample_embed, sample_many
from s2conv.schema import S2Config


class DualARTransformer(nn.Module):
    """Module attributes mirror the model tensor names: `state_dict()` keys == `hf_to_model_name(...)` names."""

    def __init__(self, cfg: S2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.codebook_embeddings = nn.Embedding(cfg.codebook_size * cfg.num_codebooks, cfg.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.intermediate_size,
                             cfg.norm_eps, qk_norm=cfg.attention_qk_norm)
            for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.fast_dim != cfg.dim:
            raise RuntimeModelError(f"fast_dim {cfg.fast_dim} != dim {cfg.dim}: fast_project_in is not supported")
        self.fast_embeddings = nn.Embedding(cfg.codebook_size, cfg.fast_dim)
        # fast AR: text config's norm_eps and rope_base (ERRATA 4); explicit softmax attention as upstream
        self.fast_layers = nn.ModuleList(
            TransformerBlock(cfg.fast_dim, cfg.fast_n_head, cfg.fast_n_local_heads, cfg.fast_head_dim,
                             cfg.fast_intermediate_size, cfg.norm_eps, qk_norm=cfg.fast_attention_qk_norm,
                             explicit_softmax=True)
            for _ in range(cfg.n_fast_layer))
        self.fast_norm = RMSNorm(cfg.fast_dim, cfg.norm_eps)
        self.fast_output = nn.Linear(cfg.fast_dim, cfg.codebook_size, bias=False)
        self.max_batch, self.max_seq = 0, 0
        self.cache_version = 0  # counts KV cache allocations: a CUDA graph captured before the last one is stale
        self.frame_loop = None  # the decode loop `frame_loop.generate_frames` keeps between calls, graphs and all
        self.batch_loop = None  # the same for `batch.generate_frames_batch`

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_weights(cls, cfg: S2Config, weights: dict[str, Tensor], dtype=torch.bfloat16,
                     device="cpu") -> "DualARTransformer":
        """Build from model-named tensors (see `s2conv.schema.hf_to_model_name`), cast to dtype on device."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_weights({k: v.to(device=device, dtype=dtype) for k, v in weights.items()})
        return model

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Assign tensors to a (meta-built) model, check the names, and build the RoPE tables on their device.

        A loader may first replace Linear modules by quantized ones whose state-dict keys match its tensors."""
        expected = set(self.state_dict().keys())
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            raise RuntimeModelError(
                f"dual-AR weights: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
                f"({len(unexpected)})")
        self.load_state_dict(weights, assign=True, strict=True)
        self.requires_grad_(False)
        self.init_buffers(self.norm.weight.device)

    def init_buffers(self, device) -> None:
        """The bf16 RoPE tables (slow: max_seq_len rows; fast: num_codebooks rows) and the fast positions."""
        cfg = self.cfg
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
                             .to(device), persistent=False)
        self.register_buffer("fast_freqs_cis", precompute_freqs_cis(
            cfg.num_codebooks, cfg.fast_head_dim, cfg.rope_base).to(device), persistent=False)
        self.register_buffer("fast_positions", torch.arange(cfg.num_codebooks, device=device), persistent=False)
        # causal masks of the fast positions, built once: a decode frame would otherwise spend two small kernels
        # (arange, compare) on each of its 10 depth steps
        self.register_buffer("fast_masks", causal_mask(self.fast_positions, cfg.num_codebooks)[:, None],
                             persistent=False)

    def setup_caches(self, batch: int, max_seq: int) -> None:
        """Preallocate the slow KV caches [batch, n_kv, max_seq (rounded up to 8), head_dim] and the fast ones.
        Caches of another batch size are reallocated: the attention code reads caches of exactly the batch's rows."""
        cfg = self.cfg
        max_seq = min(cfg.max_seq_len, -(-max_seq // 8) * 8)
        if batch == self.max_batch and max_seq <= self.max_seq:
            return
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, cfg.n_local_heads, max_seq, cfg.head_dim, dtype, device)
        for layer in self.fast_layers:
            layer.attention.kv_cache = KVCache(batch, cfg.fast_n_local_heads, cfg.num_codebooks,
                                               cfg.fast_head_dim, dtype, device)
        self.max_batch, self.max_seq = batch, max_seq
        self.cache_version += 1
        self.frame_loop = self.batch_loop = None  # their graphs read the old caches: release them (and pools) now

    # ---------------------------------------------------------------- slow AR

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, 1 + num_codebooks, S] -> input embeddings [B, S, dim] (spec 3.2).

        Text positions: E[token]. Semantic positions: (E[token] + sum_i C[code_i + codebook_size * i]) / sqrt(N + 1).
        """
        cfg = self.cfg
        ids, codes = tokens[:, 0], tokens[:, 1:]
        offsets = torch.arange(cfg.num_codebooks, device=tokens.device)[None, :, None] * cfg.codebook_size
        vq_sum = self.codebook_embeddings(codes + offsets).sum(dim=1)  # [B, S, dim]
        is_semantic = ((ids >= cfg.semantic_begin_id) & (ids <= cfg.semantic_end_id))[..., None]
        x = self.embeddings(ids) + torch.where(is_semantic, vq_sum, torch.zeros_like(vq_sum))
        if cfg.scale_codebook_embeddings:
            x = torch.where(is_semantic, x / math.sqrt(cfg.num_codebooks + 1), x)
        return x

    def forward_slow(self, tokens: Tensor, input_pos: Tensor, kv_len: int) -> Tensor:
        """Run the slow layers over tokens [B, 11, S] at cache positions input_pos [S], attending to the first
        kv_len cache slots; returns the final-normed hidden state of the last position [B, dim]."""
        x = self.embed(tokens)
        mask = causal_mask(input_pos, kv_len)
        freqs = self.freqs_cis[input_pos]
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        return self.norm(x[:, -1])

    def logits(self, hidden: Tensor) -> Tensor:
        """Full tied head: hidden [B, dim] -> [B, vocab_size]."""
        return F.linear(hidden, self.embeddings.weight)

    def semantic_logits(self, hidden: Tensor) -> Tensor:
        """Tied head restricted to the allowed main tokens: [B, n_semantic + 1], the last column is <|im_end|>.

        Only these rows of the embedding are read (the semantic mask makes every other logit -inf anyway)."""
        cfg = self.cfg
        sem = F.linear(hidden, self.embeddings.weight[cfg.semantic_begin_id: cfg.semantic_end_id + 1])
        eos = F.linear(hidden, self.embeddings.weight[cfg.eos_token_id: cfg.eos_token_id + 1])
        return torch.cat([sem, eos], dim=-1)

    def semantic_index_to_token(self, idx: Tensor) -> Tensor:
        """Column index of `semantic_logits` -> vocabulary id."""
        cfg = self.cfg
        n_sem = cfg.semantic_end_id - cfg.semantic_begin_id + 1
        return torch.where(idx == n_sem, cfg.eos_token_id, idx + cfg.semantic_begin_id)

    def prefill(self, tokens: Tensor, input_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prompt [B, 11, T] at positions input_pos (default 0..T-1) -> (normed hidden [B, dim],
        semantic logits [B, n_semantic + 1]) of the last position. Syncs once to size the attention span."""
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[-1], device=tokens.device)
        kv_len = int(input_pos.max()) + 1
        if kv_len > self.max_seq:
            raise RuntimeModelError(f"prefill reaches position {kv_len}, KV cache holds {self.max_seq}")
        hidden = self.forward_slow(tokens, input_pos, kv_len)
        return hidden, self.semantic_logits(hidden)

    def decode_slow(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """One frame column [B, 11, 1] at position input_pos [1] -> (hidden [B, dim], semantic logits).

        kv_len (a Python int > position, default the whole cache) bounds the attention span; a CUDA-graph caller
        captures one graph per kv_len bucket."""
        hidden = self.forward_slow(tokens, input_pos, kv_len or self.max_seq)
        return hidden, self.semantic_logits(hidden)

    # ---------------------------------------------------------------- fast AR

    def fast_step(self, x: Tensor, pos: int, output: bool = True) -> Tensor | None:
        """Fast layers on x [B, 1, fast_dim] at depth position pos (a Python int); returns the pre-norm output.

        output=False only fills the fast KV caches at pos and returns None: the last layer then writes its keys and
        values and skips its attention, wo and feed-forward, whose result only the discarded logits would read."""
        input_pos = self.fast_positions[pos: pos + 1]
        mask = self.fast_masks[pos]  # = causal_mask(input_pos, num_codebooks): [1, num_codebooks]
        freqs = self.fast_freqs_cis[pos: pos + 1]
        layers = self.fast_layers if output else self.fast_layers[:-1]
        for layer in layers:
            x = layer(x, freqs, mask, input_pos)
        if not output:
            self.fast_layers[-1].fill_cache(x, freqs, input_pos)
            return None
        return x

    def fast_logits(self, x: Tensor) -> Tensor:
        return self.fast_output(self.fast_norm(x))

    def sample_main(self, logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
                    previous: Tensor | None, noise: Tensor | None = None, values: Tensor | None = None) -> Tensor:
        """Main token ids [B] from semantic logits, with RAS against previous main tokens [B, W] (None: no RAS).
        noise: Exp(1) draws for the fused sampler ([>= 2, B, top_k], `sampling.draw_noise`), or None; values:
        its (temperature, top_p) pairs on the device (`sampling.sampling_values`), or None."""
        if previous is None or params.greedy or params.ras_window == 0:
            return self.semantic_index_to_token(sample(logits, params, generator, noise=noise, values=values))
        token, high = (self.semantic_index_to_token(t) for t in sample_many(
            logits, [params, params.high()], generator, noise=noise, values=values))
        cfg = self.cfg
        repeatable = (token >= cfg.semantic_begin_id) & (token <= cfg.semantic_end_id)
        return ras_select(token, high, previous, repeatable)

    def sample_frame(self, hidden: Tensor, logits: Tensor, params: SamplingParams,
                     generator: torch.Generator | None = None, previous: Tensor | None = None,
                     values: Tensor | None = None) -> Tensor:
        """Sample one frame column [B, 1 + num_codebooks] = [main token, c0, ..., c_{N-1}] (spec 3.6). values:
        the fused sampler reads params' (temperature, top_p) pairs from this device tensor (`sampling_values`)."""
        cfg = self.cfg
        # the frame's randomness in one launch: 2 main-token draws (RAS), then one per fast-AR depth 1 .. N - 1
        noise = draw_noise(params, hidden.shape[0], cfg.num_codebooks + 1, hidden.device, generator)
        main = self.sample_main(logits, params, generator, previous, noise, values)
        self.fast_step(hidden[:, None], 0, output=False)  # fills the fast KV caches at position 0 (no logits)
        code = torch.clamp(main - cfg.semantic_begin_id, 0, cfg.codebook_size - 1)
        column = [main, code]
        x_in = self.fast_embeddings(code)
        for pos in range(1, cfg.num_codebooks):
            x = self.fast_step(x_in[:, None], pos)
            depth_noise = None if noise is None else noise[pos + 1:]
            logits = self.fast_logits(x[:, 0])
            if pos + 1 < cfg.num_codebooks:  # the code's embedding is the next depth's input: drawn together
                code, x_in = sample_embed(logits, params, self.fast_embeddings.weight, generator, noise=depth_noise,
                                          values=values)
            else:
                code = sample(logits, params, generator, noise=depth_noise, values=values)
            column.append(code)
        return torch.stack(column, dim=1)

    def decode_one_frame(self, tokens: Tensor, input_pos: Tensor, params: SamplingParams,
                         generator: torch.Generator | None = None, previous: Tensor | None = None,
                         kv_len: int | None = None, values: Tensor | None = None) -> Tensor:
        """Previous frame column [B, 11, 1] at position input_pos [1] -> next frame column [B, 11]."""
        hidden, logits = self.decode_slow(tokens, input_pos, kv_len)
        return self.sample_frame(hidden, logits, params, generator, previous, values)


def check_generation(cfg: S2Config, prompt: Tensor, max_new_frames: int) -> int:
    """Validate a prompt [1 + num_codebooks, T] and a frame budget against the model; returns T."""
    if prompt.ndim != 2 or prompt.shape[0] != cfg.num_codebooks + 1:
        raise RuntimeModelError(f"prompt shape {tuple(prompt.shape)}, expected ({cfg.num_codebooks + 1}, T)")
    if max_new_frames < 1:
        raise RuntimeModelError(f"max_new_frames must be >= 1, got {max_new_frames}")
    t = prompt.shape[1]
    if t + max_new_frames > cfg.max_seq_len:
        raise RuntimeModelError(f"prompt {t} + max_new_frames {max_new_frames} exceeds max_seq_len {cfg.max_seq_len}")
    return t


def _kv_bucket(n: int, max_seq: int, step: int = 256) -> int:
    return min(max_seq, -(-n // step) * step)


@torch.inference_mode()
def generate(model: DualARTransformer, prompt: Tensor, max_new_frames: int, params: SamplingParams = SamplingParams(),
             generator: torch.Generator | None = None,
             on_frame=None) -> Tensor:
    """Generate codes for one prompt [1 + num_codebooks, T] -> codes [num_codebooks, n_frames].

    Stops after max_new_frames frames or at the first frame whose main token is <|im_end|>; that frame is dropped
    (unlike upstream, which also drops the last frame when the limit is hit without <|im_end|>).
    """
    cfg = model.cfg
    t = check_generation(cfg, prompt, max_new_frames)
    model.setup_caches(1, t + max_new_frames)
    hidden, logits = model.prefill(prompt[None])
    frame = model.sample_frame(hidden, logits, params, generator)  # the first frame has no RAS window
    previous = torch.zeros(1, params.ras_window, dtype=frame.dtype, device=frame.device)
    frames = []
    pos = torch.tensor([t], device=prompt.device)
    while int(frame[0, 0]) != cfg.eos_token_id:
        frames.append(frame)
        if on_frame is not None:  # progress reporting: called with the number of frames so far
            on_frame(len(frames))
        if len(frames) == max_new_frames:
            break
        frame = model.decode_one_frame(frame[:, :, None], pos, params, generator, previous,
                                       kv_len=_kv_bucket(int(pos) + 1, model.max_seq))
        previous = torch.cat([previous[:, 1:], frame[:, :1]], dim=1) if params.ras_window else previous
        pos += 1
    if not frames:
        return torch.zeros(cfg.num_codebooks, 0, dtype=torch.long, device=prompt.device)
    return torch.cat(frames, dim=0)[:, 1:].T.contiguous()
