"""vLLM structured outputs for voice design: a grammar over token ids.

After the controllable prompt the base model writes, in its training format,
``<|start_acoustic_token|>`` attribute values (``<|pitch_value_N|>``,
``<|speed_value_N|>``) ``<|end_acoustic_token|>``, then ``<|start_global_token|>``,
the 32 ``<|bicodec_global_N|>`` tokens of its voice, ``<|end_global_token|>``,
``<|start_semantic_token|>`` and the ``<|bicodec_semantic_N|>`` tokens of the speech,
ended by ``<|im_end|>`` (or ``<|end_semantic_token|>``). :func:`design_grammar`
writes that shape as a Lark grammar for vLLM's ``structured_outputs: {"grammar":
...}``, so that a generation cannot write another count of global tokens.

Why token ids (``<[151665-155760]>``), not a regex over the text: a regex constrains
the *text*, and the tokenizer can spell ``<|bicodec_global_5|>`` with plain
byte-level tokens as well as with the one added token. Measured on vLLM 0.32 (CPU,
xgrammar) with the tests' tiny model: a regex let it spell the markers byte by byte,
so the ids the gateway reads did not hold the voice; the grammar over ids did. Both
backends vLLM ships take this grammar (xgrammar, vLLM's choice with
``--structured-outputs-config.backend auto``, and llguidance); repetition is written
``{n}`` / ``{m,n}``, which both parse.

The grammar stops after the first semantic token may end: the end tokens are the
request's ``stop_token_ids``, and vLLM lets a grammar accept a stop token only where
the grammar may end, never as one of its own terminals (a grammar that named the end
token ran on past it to ``max_tokens``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from decoder_gateway.errors import UpstreamError
from decoder_gateway.llm.client import LLMClient
from decoder_gateway.llm.prompt import TokenMap
from decoder_gateway.voices.catalog import GLOBAL_TOKEN_COUNT

logger = logging.getLogger(__name__)

START_ACOUSTIC = "<|start_acoustic_token|>"
END_ACOUSTIC = "<|end_acoustic_token|>"
START_GLOBAL = "<|start_global_token|>"
END_GLOBAL = "<|end_global_token|>"
START_SEMANTIC = "<|start_semantic_token|>"
MARKER_NAMES = (START_ACOUSTIC, END_ACOUSTIC, START_GLOBAL, END_GLOBAL, START_SEMANTIC)
REQUIRED_MARKERS = (START_GLOBAL, END_GLOBAL, START_SEMANTIC)
# Attribute tokens between <|start_acoustic_token|> and <|end_acoustic_token|>: the
# base model writes two (a pitch value and a speed value); its training format has at
# most four (pitch, pitch variation, loudness, speed). Room for twice that.
MAX_ATTRIBUTE_TOKENS = 8


@dataclass(frozen=True)
class DesignMarkers:
    """Ids of the markers around a designed voice, as the served tokenizer has them
    (upstream: PROTOCOL.md). ``start_acoustic`` / ``end_acoustic`` are None for a
    tokenizer without them: the grammar then has no attribute block."""

    start_global: int
    end_global: int
    start_semantic: int
    start_acoustic: int | None = None
    end_acoustic: int | None = None

    @classmethod
    def from_ids(cls, ids: dict[str, int]) -> DesignMarkers:
        """From :meth:`LLMClient.token_ids` of :data:`MARKER_NAMES`; ValueError naming
        the markers the tokenizer lacks."""
        missing = [name for name in REQUIRED_MARKERS if name not in ids]
        if missing:
            raise ValueError(f"the tokenizer has no single token for {', '.join(missing)}")
        acoustic = START_ACOUSTIC in ids and END_ACOUSTIC in ids
        return cls(
            start_global=ids[START_GLOBAL],
            end_global=ids[END_GLOBAL],
            start_semantic=ids[START_SEMANTIC],
            start_acoustic=ids[START_ACOUSTIC] if acoustic else None,
            end_acoustic=ids[END_ACOUSTIC] if acoustic else None,
        )


def _token(token_id: int) -> str:
    return f"<[{token_id}]>"


def _token_range(first: int, last: int) -> str:
    return f"<[{first}-{last}]>"


def design_grammar(token_map: TokenMap, markers: DesignMarkers) -> str:
    """The Lark grammar of a design generation, over token ids:
    ``[<|start_acoustic_token|> attribute{0,8} <|end_acoustic_token|>]
    <|start_global_token|> global{32} <|end_global_token|> <|start_semantic_token|>
    semantic+``, then a stop token.

    Attribute tokens are any between the semantic block and the first marker (in the
    upstream vocabulary: the pitch, speed, loudness values and labels, ages, genders,
    emotions, then the task tokens). ValueError when a marker sits inside the global
    or semantic block (a tokenizer that is not Spark-TTS's).
    """
    global_last = token_map.global_base + token_map.global_size - 1
    semantic_last = token_map.semantic_base + token_map.semantic_size - 1
    blocks = ((token_map.global_base, global_last), (token_map.semantic_base, semantic_last))
    marker_ids = [
        token_id
        for token_id in (
            markers.start_global,
            markers.end_global,
            markers.start_semantic,
            markers.start_acoustic,
            markers.end_acoustic,
        )
        if token_id is not None
    ]
    for token_id in marker_ids:
        if any(first <= token_id <= last for first, last in blocks):
            raise ValueError(f"marker id {token_id} lies among the BiCodec tokens")
    rules = [
        "start: acoustic? "
        f"{_token(markers.start_global)} voice{{{GLOBAL_TOKEN_COUNT}}} "
        f"{_token(markers.end_global)} {_token(markers.start_semantic)} speech+"
    ]
    first_attribute = max(global_last, semantic_last) + 1
    last_attribute = min(marker_ids) - 1
    if (
        markers.start_acoustic is not None
        and markers.end_acoustic is not None
        and first_attribute <= last_attribute
    ):
        rules.append(
            f"acoustic: {_token(markers.start_acoustic)} attribute{{0,{MAX_ATTRIBUTE_TOKENS}}} "
            f"{_token(markers.end_acoustic)}"
        )
        rules.append(f"attribute: {_token_range(first_attribute, last_attribute)}")
    else:
        rules[0] = rules[0].replace("start: acoustic? ", "start: ")
    rules.append(f"voice: {_token_range(token_map.global_base, global_last)}")
    rules.append(f"speech: {_token_range(token_map.semantic_base, semantic_last)}")
    return "\n".join(rules) + "\n"


class DesignConstraint:
    """vLLM's ``structured_outputs`` for a generation that designs a voice (the design
    endpoint's, a style request's first sentence), or None with
    DESIGN_STRUCTURED_OUTPUTS off. The grammar is built on first use, from the marker
    ids of vLLM's tokenizer and the checked BiCodec token map."""

    def __init__(self, llm: LLMClient, enabled: bool) -> None:
        self.llm = llm
        self.enabled = enabled
        self._grammar: str | None = None

    async def structured_outputs(self) -> dict[str, str] | None:
        if not self.enabled:
            return None
        if self._grammar is None:
            if not self.llm.token_map_checked:  # vLLM was away at start-up
                await self.llm.check_token_map()
            ids = await self.llm.token_ids(MARKER_NAMES)
            try:
                grammar = design_grammar(self.llm.token_map, DesignMarkers.from_ids(ids))
            except ValueError as err:
                raise UpstreamError(
                    f"cannot constrain design generations to the Spark-TTS format: {err}. "
                    "Is MODEL_NAME a Spark-TTS model? (DESIGN_STRUCTURED_OUTPUTS=off "
                    "sends them unconstrained)"
                ) from err
            self._grammar = grammar
            logger.info("design generations use structured outputs: %s", ids)
        return {"grammar": self._grammar}
