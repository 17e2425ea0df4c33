"""The S2 Pro prompt: conversation messages -> the [1 + num_codebooks, T] token matrix the slow AR reads.

Mirrors fish-speech's Conversation / ContentSequence encoding for inference (fish_speech/conversation.py,
content_sequence.py, models/text2semantic/inference.py::generate_long): every text part is tokenized on its own
(no special tokens added) and the id lists are concatenated; a VQ part contributes one column per frame whose row 0
is the semantic token `semantic_begin_id + code0` and rows 1.. are the frame's codes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from s2conv.errors import RuntimeModelError

IM_START, IM_END, VOICE = "<|im_start|>", "<|im_end|>", "<|voice|>"
SPEAKER_RE = re.compile(r"(<\|speaker:\d+\|>)")

Part = "str | torch.Tensor"  # text, or codes [num_codebooks, T]


@dataclass
class Message:
    """One chat message. `parts` are text strings or code matrices [num_codebooks, T]."""

    role: str
    parts: list = field(default_factory=list)
    voice: bool = False  # the assistant's <|voice|> modality token after the role line
    add_im_end: bool = True

    def render(self) -> list:
        """The message as prompt parts: "<|im_start|>{role}\\n{modality}" + parts + "<|im_end|>\\n"."""
        head = f"{IM_START}{self.role}\n{VOICE if self.voice else ''}"
        return [head, *self.parts] + ([IM_END + "\n"] if self.add_im_end else [])


def system_message(ref_texts: list[str] | None = None, ref_codes: list[torch.Tensor] | None = None) -> Message:
    """The system message: plain TTS, or voice cloning from reference transcripts and their codes."""
    if not ref_texts or not ref_codes:
        return Message("system", ["convert the provided text to speech"])
    if len(ref_texts) != len(ref_codes):
        raise RuntimeModelError(f"{len(ref_texts)} reference transcripts for {len(ref_codes)} reference clips")
    # a transcript without a speaker tag gets <|speaker:i|> by its position, as upstream does
    tagged = [t if SPEAKER_RE.search(t) else f"<|speaker:{i}|>{t}" for i, t in enumerate(ref_texts)]
    return Message("system", [
        "convert the provided text to speech reference to the following:\n\nText:\n",
        "\n".join(tagged),
        "\n\nSpeech:\n",
        torch.cat(list(ref_codes), dim=1),
    ])


def encode_parts(tokenizer, parts: list, *, semantic_begin_id: int, num_codebooks: int) -> torch.Tensor:
    """Prompt parts -> LongTensor [1 + num_codebooks, T]. `tokenizer` is a `tokenizers.Tokenizer`."""
    columns = []
    for part in parts:
        if isinstance(part, str):
            ids = torch.tensor(tokenizer.encode(part, add_special_tokens=False).ids, dtype=torch.long)
            col = torch.zeros(1 + num_codebooks, len(ids), dtype=torch.long)
            col[0] = ids
        else:
            codes = part.to(torch.long)
            if codes.dim() != 2 or codes.shape[0] != num_codebooks:
                raise RuntimeModelError(f"codes must be [{num_codebooks}, T], got {list(codes.shape)}")
            col = torch.cat([codes[:1] + semantic_begin_id, codes], dim=0)
        columns.append(col)
    return torch.cat(columns, dim=1)


def split_text_by_speaker(text: str) -> list[str]:
    """Split at <|speaker:N|> tags into turns, each starting with its tag. Text before the first tag is dropped."""
    pieces = SPEAKER_RE.split(text)
    turns = []
    for i, piece in enumerate(pieces):
        if SPEAKER_RE.fullmatch(piece.strip()):
            rest = pieces[i + 1] if i + 1 < len(pieces) else ""
            turns.append((piece.strip() + rest).strip())
    return turns


def group_turns(turns: list[str], max_turns: int = 5, max_bytes: int = 512) -> list[str]:
    """Group turns into batches: a new batch starts when the current one holds `max_turns` turns or the next turn
    would take it past `max_bytes` UTF-8 bytes. Turns of a batch are joined by newlines."""
    batches, current, size = [], [], 0
    for turn in turns:
        n = len(turn.encode("utf-8"))
        if current and (len(current) >= max_turns or size + n > max_bytes):
            batches.append("\n".join(current))
            current, size = [], 0
        current.append(turn)
        size += n
    if current:
        batches.append("\n".join(current))
    return batches


def text_batches(text: str, chunk_bytes: int = 512) -> list[str]:
    """The user-text batches synthesized one after another (multi-turn), as upstream's generate_long splits them."""
    turns = split_text_by_speaker(text)
    return group_turns(turns, max_bytes=chunk_bytes) if turns else [text]


def generation_prompt(history: list[Message], user_text: str) -> list:
    """Parts of the prompt that asks for speech of `user_text`, after `history` (system + earlier turns)."""
    messages = [*history, Message("user", [user_text]), Message("assistant", [], voice=True, add_im_end=False)]
    return [p for m in messages for p in m.render()]
