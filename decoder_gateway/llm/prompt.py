"""Spark-TTS prompts and the token ids the gateway reads back (PROTOCOL.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from decoder_gateway.voices.catalog import Voice, check_global_tokens

Gender = Literal["female", "male"]
Level = Literal["very_low", "low", "moderate", "high", "very_high"]
# A label's index is the N of its token: <|gender_N|> (ids 165032 + N), <|pitch_label_N|>
# (164965 + N), <|speed_label_N|> (164986 + N), as in PROTOCOL.md.
GENDERS: tuple[Gender, ...] = get_args(Gender)
LEVELS: tuple[Level, ...] = get_args(Level)


@dataclass(frozen=True)
class TokenMap:
    """Where the BiCodec tokens sit in the LLM's vocabulary.

    The defaults are the upstream ids; the gateway checks them against vLLM's
    ``/tokenize`` at start-up, since a fine-tune could in principle differ.
    """

    global_base: int = 151665  # <|bicodec_global_0|>
    semantic_base: int = 155761  # <|bicodec_semantic_0|>
    end_semantic: int = 165157  # <|end_semantic_token|>
    im_end: int = 151645  # <|im_end|>
    global_size: int = 4096
    semantic_size: int = 8192

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.end_semantic, self.im_end]


# Special tokens of the Spark / Qwen2 vocabulary are all spelled <|name|>. vLLM's
# tokenizer turns such a spelling in the text into the special token itself, so text
# holding one could end the content and rewrite the prompt (e.g. the voice's global
# tokens). Any <|...|> is refused; "<|" or "|>" alone is harmless.
_MARKUP = re.compile(r"<\|[^<>]*?\|>")


def find_markup(text: str) -> str | None:
    """The first piece of prompt markup (``<|...|>``) in ``text``, or None."""
    match = _MARKUP.search(text)
    return match.group(0) if match else None


def global_token(index: int) -> str:
    return f"<|bicodec_global_{index}|>"


def speaker_prompt(voice: Voice, text: str, global_tokens: list[int] | None = None) -> str:
    """The fine-tunes' training format; with global tokens the model writes only semantics.

    Without them the prompt stops at ``<|start_global_token|>`` and the model writes
    the 32 global tokens first.
    """
    pinned = global_tokens if global_tokens is not None else voice.global_tokens
    prompt = f"<|task_tts|><|start_content|>{voice.speaker_id}: {text}<|end_content|>"
    prompt += "<|start_global_token|>"
    if pinned is None:
        return prompt
    return (
        prompt + "".join(map(global_token, pinned)) + "<|end_global_token|><|start_semantic_token|>"
    )


@dataclass(frozen=True)
class VoiceStyle:
    """The base model's style labels: what a designed voice is asked to sound like."""

    gender: Gender
    pitch: Level
    speed: Level

    def label_tokens(self) -> str:
        return (
            f"<|gender_{GENDERS.index(self.gender)}|>"
            f"<|pitch_label_{LEVELS.index(self.pitch)}|>"
            f"<|speed_label_{LEVELS.index(self.speed)}|>"
        )


def controllable_prompt(text: str, style: VoiceStyle) -> str:
    """The base model's voice-design prompt: it writes a voice's 32 global tokens for
    the labels (after attribute tokens of its own), then the semantic tokens of ``text``."""
    return (
        f"<|task_controllable_tts|><|start_content|>{text}<|end_content|>"
        f"<|start_style_label|>{style.label_tokens()}<|end_style_label|>"
    )


def base_prompt(text: str, global_tokens: list[int]) -> str:
    """The base model's plain prompt in a given voice: no speaker id before the text
    (the base model was trained without one), the model writes only semantics."""
    tokens = "".join(map(global_token, check_global_tokens(global_tokens)))
    return (
        f"<|task_tts|><|start_content|>{text}<|end_content|>"
        f"<|start_global_token|>{tokens}<|end_global_token|><|start_semantic_token|>"
    )
