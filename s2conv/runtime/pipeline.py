"""Text (and an optional reference voice) -> 44.1 kHz waveform, the way fish-speech's generate_long runs it.

    tts = s2conv.runtime.load("s2-pro-q4.gguf", device="cuda")
    wav = tts.synthesize("Hello there.")            # float32 [n_samples], tts.sample_rate Hz

Long text is split at <|speaker:N|> tags into batches; each batch is generated as one more conversation turn
conditioned on the audio codes of the previous ones, and the codes of all batches are decoded together.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from s2conv.errors import RuntimeModelError
from s2conv.runtime import prompt as P
from s2conv.runtime.audio import load_audio
from s2conv.runtime.dual_ar import generate
from s2conv.runtime.frame_loop import generate_frames
from s2conv.runtime.loader import LoadedModel, load_model
from s2conv.runtime.sampling import SamplingParams
from s2conv.runtime.warmup import compile_kernels

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
PROMPT_RESERVE = 2048  # upstream refuses prompts longer than max_seq_len - 2048


@dataclass
class Reference:
    """A voice-cloning reference: its transcript and its codes [num_codebooks, T]."""

    text: str
    codes: torch.Tensor


class TTS:
    """A loaded S2 Pro model ready to synthesize speech."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.loaded, self.device = loaded, device
        self.cfg = loaded.config
        self.sample_rate = loaded.codec.cc.sample_rate

    # ----- references -------------------------------------------------------------------------------------------
    def encode_reference(self, audio_path: str | Path, text: str) -> Reference:
        """Reference clip (any rate / channels) + its transcript -> codes, as fish-speech's encode_audio."""
        if not text or not text.strip():
            raise RuntimeModelError("a reference clip needs its transcript (--ref-text)")
        wav = load_audio(audio_path, self.sample_rate)
        frame = self.loaded.codec.cc.frame_length
        if wav.numel() < frame:
            raise RuntimeModelError(f"reference audio {str(audio_path)!r} is shorter than one frame "
                                    f"({wav.numel()} < {frame} samples)")
        if wav.abs().max() < 1e-4:
            raise RuntimeModelError(f"reference audio {str(audio_path)!r} is silent")
        codes = self.loaded.codec.encode(wav.to(self.device)[None, None])[0]
        return Reference(_clean_text(text), codes.cpu())

    # ----- synthesis --------------------------------------------------------------------------------------------
    def generate_codes(self, text: str, references: list[Reference] | None = None, *, seed: int = 0,
                       params: SamplingParams = SamplingParams(), max_frames: int = 1024,
                       chunk_bytes: int = 512, progress: bool = False) -> torch.Tensor:
        """Codes [num_codebooks, n_frames] for `text` (all batches concatenated). `progress` shows a frame bar."""
        text = _clean_text(text)
        if not text.strip():
            raise RuntimeModelError("the text to synthesize is empty")
        if max_frames < 1:
            raise RuntimeModelError(f"--max-frames must be >= 1, got {max_frames}")
        references = references or []
        history = [P.system_message([r.text for r in references], [r.codes for r in references])]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        model, cfg = self.loaded.model, self.cfg
        all_codes = []
        for batch in P.text_batches(text, chunk_bytes):
            tokens = self._turn_tokens(history, batch, "shorten the text or the reference, or split it with "
                                                       "<|speaker:N|> tags")
            frames = min(max_frames, cfg.max_seq_len - tokens.shape[1])
            with tqdm(total=frames, unit="frame", disable=not progress, leave=False,
                      desc=f"batch {len(all_codes) + 1}") as bar:
                on_frame = lambda n: bar.update(n - bar.n)  # noqa: E731
                if self.device.type == "cuda":  # whole-frame CUDA graphs, seeded from the device generator
                    codes = generate_frames(model, tokens.to(self.device), frames, params, seed=seed + len(all_codes),
                                            on_frame=on_frame)
                else:
                    codes = generate(model, tokens.to(self.device), frames, params, generator, on_frame=on_frame)
            all_codes.append(codes)
            history += [P.Message("user", [batch]), P.Message("assistant", [codes.cpu()], voice=True)]
        return torch.cat(all_codes, dim=1)

    def _turn_tokens(self, history: list, text: str, hint: str) -> torch.Tensor:
        """The prompt matrix [1 + num_codebooks, T] of the conversation so far plus the user turn `text`; one error
        line (ending in `hint`) when T is over the model's prompt limit."""
        cfg = self.cfg
        tokens = P.encode_parts(self.loaded.tokenizer, P.generation_prompt(history, text),
                                semantic_begin_id=cfg.semantic_begin_id, num_codebooks=cfg.num_codebooks)
        limit = cfg.max_seq_len - PROMPT_RESERVE
        if tokens.shape[1] > limit:
            raise RuntimeModelError(f"prompt of {tokens.shape[1]} tokens exceeds the model's limit of {limit}: {hint}")
        return tokens

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [num_codebooks, T] -> float32 waveform [T * frame_length]."""
        if codes.shape[1] == 0:
            return torch.zeros(0)
        return self.loaded.codec.decode(codes.to(self.device)[None])[0, 0].float().cpu()

    def synthesize(self, text: str, ref_audio: str | Path | None = None, ref_text: str | None = None, *,
                   seed: int = 0, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 30,
                   max_frames: int = 1024) -> torch.Tensor:
        """Text (and optionally a reference clip with its transcript) -> waveform float32 [n_samples]."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        refs = [self.encode_reference(ref_audio, ref_text or "")] if ref_audio is not None else []
        return self.decode(self.generate_codes(text, refs, seed=seed, params=params, max_frames=max_frames))

    # ----- batched synthesis (throughput) -----------------------------------------------------------------------
    def generate_codes_batch(self, texts: list[str], references: list[Reference] | None = None, *, seed: int = 0,
                             params: SamplingParams = SamplingParams(), max_frames: int = 1024,
                             chunk_bytes: int = 512) -> list[torch.Tensor]:
        """Codes [num_codebooks, n_i] per text, all texts decoded together as one batch (same voice/references).

        Each text must fit one conversation turn batch (see `P.text_batches`); longer multi-turn texts go through
        `generate_codes`. Greedy rows equal `generate_codes` of that text; sampled rows share one seeded stream."""
        from s2conv.runtime.batch import generate_frames_batch

        if not texts:
            raise RuntimeModelError("generate_codes_batch needs at least one text, got 0")
        if max_frames < 1:
            raise RuntimeModelError(f"--max-frames must be >= 1, got {max_frames}")
        references = references or []
        history = [P.system_message([r.text for r in references], [r.codes for r in references])]
        cfg = self.cfg
        prompts = []
        for i, text in enumerate(texts):
            text = _clean_text(text)
            if not text.strip():
                raise RuntimeModelError(f"text {i} of the batch is empty")
            batches = P.text_batches(text, chunk_bytes)
            if len(batches) != 1:
                raise RuntimeModelError(f"text {i} splits into {len(batches)} turn batches, expected 1: "
                                        "synthesize it alone with generate_codes")
            prompts.append(self._turn_tokens(history, batches[0], f"shorten text {i}").to(self.device))
        frames = min(max_frames, cfg.max_seq_len - max(p.shape[1] for p in prompts))
        return generate_frames_batch(self.loaded.model, prompts, frames, params, seed=seed)

    def synthesize_batch(self, texts: list[str], *, seed: int = 0, temperature: float = 0.8, top_p: float = 0.8,
                         top_k: int = 30, max_frames: int = 1024) -> list[torch.Tensor]:
        """Several texts -> one float32 waveform [n_samples_i] each, generated as one batch (default voice)."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        codes = self.generate_codes_batch(texts, seed=seed, params=params, max_frames=max_frames)
        return [self.decode(c) for c in codes]


def _clean_text(text: str) -> str:
    """Drop control characters (other than tab and newline), which carry no speech and confuse the tokenizer."""
    return _CONTROL_CHARS.sub("", text)


def load(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> TTS:
    """Load a GGUF for synthesis on `device` (default: cuda when available, else cpu)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(path, device=device, dtype=dtype)
    compile_kernels(loaded.model)  # all at once now, rather than one by one during the first synthesis
    return TTS(loaded, device)


def synthesize_to_file(model_path: str | Path, text: str, output: str | Path, *, ref_audio=None, ref_text=None,
                       seed: int = 0, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 30,
                       max_frames: int = 1024, device: str | None = None, progress: bool = False) -> float:
    """The `s2conv synth` job: load, synthesize, write a WAV (nothing is written on failure). Returns seconds."""
    from s2conv.runtime.audio import save_wav

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)  # validate before loading
    if ref_audio is not None and not Path(ref_audio).is_file():
        raise RuntimeModelError(f"reference audio {str(ref_audio)!r}: no such file")
    if not _clean_text(text).strip():
        raise RuntimeModelError("the text to synthesize is empty")
    tts = load(model_path, device=device)
    refs = [tts.encode_reference(ref_audio, ref_text or "")] if ref_audio is not None else []
    codes = tts.generate_codes(text, refs, seed=seed, params=params, max_frames=max_frames, progress=progress)
    wav = tts.decode(codes)
    save_wav(output, wav, tts.sample_rate)
    return wav.numel() / tts.sample_rate
