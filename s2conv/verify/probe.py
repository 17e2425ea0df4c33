"""Model and audio levels of `s2conv verify`: the same fixed prompts through the source model and the file's model.

A probe prompt is a TTS conversation whose assistant turn holds seeded random codes, followed by <|im_end|>.
Teacher forcing gives, at every audio position, the slow AR's semantic distribution (semantic ids + <|im_end|>)
and, for every frame, the fast AR's distribution of codebooks 1..N-1 given the true previous codes (codebook 0 is
the semantic token). The codec decodes the same codes; greedy synthesis runs from the prompt without its codes.
Outputs are computed one model at a time, so only one model is in memory.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from s2conv.errors import S2ConvError
from s2conv.runtime import prompt as P
from s2conv.runtime.dual_ar import DualARTransformer, generate
from s2conv.runtime.layers import causal_mask
from s2conv.runtime.sampling import SamplingParams

PROBE_TEXTS = (
    "Hello, this is a test of the speech model.",
    "The quick brown fox jumps over the lazy dog, and then it runs away into the forest.",
    "Numbers like 42 and 3.14 should be read aloud clearly.",
)
CLONE_REFERENCE_TEXT = "This is the voice that the model should imitate."


@dataclass(frozen=True)
class ProbeSettings:
    """What the model and audio levels run: frames of random codes per prompt, greedy frames, the seed."""

    texts: tuple[str, ...] = PROBE_TEXTS
    frames: int = 32  # teacher-forced audio frames per prompt
    reference_frames: int = 16  # codes of the voice-cloning reference in the last prompt's system message
    greedy_frames: int = 32  # 0 skips greedy synthesis
    seed: int = 0

    def __post_init__(self):
        if not self.texts or self.frames < 1 or self.reference_frames < 0 or self.greedy_frames < 0:
            raise S2ConvError(f"verify probe: need texts, frames >= 1, reference_frames >= 0 and greedy_frames >= 0; "
                              f"got {len(self.texts)} texts, {self.frames}, {self.reference_frames}, "
                              f"{self.greedy_frames}")


@dataclass
class ProbePrompt:
    """tokens [1 + N, T]: prompt (first_audio columns), then `codes` [N, F] as frames, then <|im_end|>."""

    text: str
    tokens: Tensor
    first_audio: int
    codes: Tensor


@dataclass
class ProbeOutputs:
    """One model's outputs for every probe prompt (all on the CPU, float32)."""

    semantic_logits: list[Tensor] = field(default_factory=list)  # [F + 1, n_semantic + 1] per prompt
    fast_logits: list[Tensor] = field(default_factory=list)  # [F, N - 1, codebook_size] per prompt
    greedy_codes: list[Tensor] = field(default_factory=list)  # [N, n_frames] per prompt
    waveforms: list[Tensor] = field(default_factory=list)  # [F * frame_length] per prompt
    greedy_seconds: float = 0.0
    greedy_frames: int = 0


def build_prompts(tokenizer, cfg, cc, settings: ProbeSettings) -> list[ProbePrompt]:
    """The probe prompts. Codes are valid for the codec: codebook 0 < semantic codebook size, others < residual
    codebook size (both <= cfg.codebook_size). The last prompt is a voice-cloning prompt (reference in the system
    message), the others plain TTS."""
    g = torch.Generator().manual_seed(settings.seed)
    n = cfg.num_codebooks
    sizes = torch.tensor([min(cc.semantic_codebook_size, cfg.codebook_size)]
                         + [min(cc.residual_codebook_size, cfg.codebook_size)] * (n - 1))

    def random_codes(frames: int) -> Tensor:
        return (torch.rand(n, frames, generator=g) * sizes[:, None]).long()  # [N, F]

    prompts = []
    for i, text in enumerate(settings.texts):
        clone = i == len(settings.texts) - 1 and settings.reference_frames > 0
        system = (P.system_message([CLONE_REFERENCE_TEXT], [random_codes(settings.reference_frames)]) if clone
                  else P.system_message())
        codes = random_codes(settings.frames)
        head = P.generation_prompt([system], text)
        kw = dict(semantic_begin_id=cfg.semantic_begin_id, num_codebooks=n)
        prompt_tokens = P.encode_parts(tokenizer, head, **kw)
        tokens = P.encode_parts(tokenizer, head + [codes, P.IM_END], **kw)
        prompts.append(ProbePrompt(text, tokens, prompt_tokens.shape[1], codes))
    return prompts


SINGLE_THREAD_MAX_PARAMS = 50_000_000


@contextlib.contextmanager
def threads_for(n_params: int, device: str = "cpu"):
    """Run small models on one CPU thread: their ops are too small to split, and a thread pool stalls badly when
    the cores are busy (8.9 s instead of 42 s CPU time for a tiny-checkpoint verify on a loaded 2-core machine).
    Larger models and GPU runs keep torch's setting; the previous setting is restored."""
    if str(device) != "cpu" or n_params >= SINGLE_THREAD_MAX_PARAMS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _without_kv_cache(model: DualARTransformer):
    """Run attention over whole sequences: detach the KV caches that `generate` may have set up, then restore."""
    modules = [layer.attention for layer in list(model.layers) + list(model.fast_layers)]
    saved = [m.kv_cache for m in modules]
    try:
        for m in modules:
            m.kv_cache = None
        yield
    finally:
        for m, c in zip(modules, saved):
            m.kv_cache = c


@torch.inference_mode()
def teacher_forced_logits(model: DualARTransformer, prompt: ProbePrompt) -> tuple[Tensor, Tensor]:
    """(semantic logits [F + 1, n_semantic + 1], fast logits [F, N - 1, codebook_size]) as float32 on the CPU.

    Row f of the semantic logits predicts frame f's semantic token (row F: <|im_end|>); fast row [f, k - 1] is
    codebook k of frame f given the hidden state before the frame and codes 0..k-1, as `sample_frame` feeds them."""
    cfg = model.cfg
    device = model.norm.weight.device
    tokens = prompt.tokens.to(device)
    t, p, n_frames = tokens.shape[1], prompt.first_audio, prompt.codes.shape[1]
    with _without_kv_cache(model):
        pos = torch.arange(t, device=device)
        x = model.embed(tokens[None])  # (1, T, D)
        mask, freqs = causal_mask(pos, t), model.freqs_cis[:t]
        for layer in model.layers:
            x = layer(x, freqs, mask, pos)
        hidden = model.norm(x)[0, p - 1: p + n_frames]  # (F + 1, D): the states that predict frames and <|im_end|>
        semantic = model.semantic_logits(hidden)
        n = cfg.num_codebooks
        codes = prompt.codes.to(device)
        fast_in = torch.cat([hidden[:n_frames, None], model.fast_embeddings(codes[: n - 1].T)], dim=1)  # (F, N, D)
        fpos = torch.arange(n, device=device)
        fmask, ffreqs = causal_mask(fpos, n), model.fast_freqs_cis[:n]
        for layer in model.fast_layers:
            fast_in = layer(fast_in, ffreqs, fmask, fpos)
        fast = model.fast_logits(fast_in[:, 1:])  # (F, N - 1, K): depth position k predicts codebook k
    return semantic.float().cpu(), fast.float().cpu()


def semantic_targets(cfg, prompt: ProbePrompt) -> Tensor:
    """Reference tokens of the semantic rows: frame f's code 0, then the <|im_end|> column index."""
    n_semantic = cfg.semantic_end_id - cfg.semantic_begin_id + 1
    return torch.cat([prompt.codes[0], torch.tensor([n_semantic])])


def fast_targets(prompt: ProbePrompt) -> Tensor:
    """[F, N - 1]: codebooks 1..N-1 of every frame."""
    return prompt.codes[1:].T


def run_model(model: DualARTransformer, prompts: list[ProbePrompt], greedy_frames: int,
              out: ProbeOutputs | None = None) -> ProbeOutputs:
    """Teacher-forced logits of every prompt, then greedy codes (temperature 0) from each prompt's head."""
    out = out or ProbeOutputs()
    for pr in prompts:
        sem, fast = teacher_forced_logits(model, pr)
        out.semantic_logits.append(sem)
        out.fast_logits.append(fast)
    if greedy_frames > 0:
        device = model.norm.weight.device
        t0 = time.perf_counter()
        for pr in prompts:
            codes = generate(model, pr.tokens[:, : pr.first_audio].to(device), greedy_frames,
                             SamplingParams(temperature=0.0))
            out.greedy_codes.append(codes.cpu())
            out.greedy_frames += codes.shape[1]
        out.greedy_seconds = time.perf_counter() - t0
    return out


def run_codec(codec, prompts: list[ProbePrompt], out: ProbeOutputs) -> ProbeOutputs:
    """Decode every prompt's codes to a float32 waveform on the CPU."""
    device = next(codec.parameters()).device
    for pr in prompts:
        out.waveforms.append(codec.decode(pr.codes.to(device)[None])[0, 0].float().cpu())
    return out
