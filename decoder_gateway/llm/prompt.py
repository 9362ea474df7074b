"""Spark-TTS prompts and the token ids the gateway reads back (PROTOCOL.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from decoder_gateway.voices.catalog import Voice


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
