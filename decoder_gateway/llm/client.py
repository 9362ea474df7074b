"""Streaming completions from vLLM's OpenAI server, turned into BiCodec token ids.

Ids come from the chunks' ``token_ids`` (vLLM's ``return_token_ids``) when the
server sends them, else from the text, with a parser that copes with tokens split
across chunks and spaces between tokens. Leaving the stream early closes the HTTP
response, which makes vLLM abort the request and free its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
import openai
from openai import AsyncOpenAI

from decoder_gateway.errors import UpstreamError, UpstreamUnavailable
from decoder_gateway.llm.prompt import TokenMap

logger = logging.getLogger(__name__)

_SPARK_TOKEN = re.compile(r"<\|bicodec_(semantic|global)_(\d+)\|>")
_ANY_SPECIAL = re.compile(r"<\|[^|<>]+\|>")


def prompt_token_bound(prompt: str) -> int:
    """An upper bound on the prompt's length in tokens, without a round trip.

    Each ``<|...|>`` is one added token; byte-level BPE never makes more tokens of
    the rest than it has UTF-8 bytes.
    """
    specials = len(_ANY_SPECIAL.findall(prompt))
    return specials + len(_ANY_SPECIAL.sub("", prompt).encode())


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_tokens: int


@dataclass
class TokenDelta:
    """The BiCodec tokens of one streamed chunk, as codebook indices (not vocab ids)."""

    global_tokens: list[int] = field(default_factory=list)
    semantic: list[int] = field(default_factory=list)


class SparkTextParser:
    """BiCodec tokens out of streamed text; a token may be split across chunks."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> TokenDelta:
        buffer = self._pending + text
        delta = TokenDelta()
        end = 0
        for match in _SPARK_TOKEN.finditer(buffer):
            kind, value = match.group(1), int(match.group(2))
            (delta.semantic if kind == "semantic" else delta.global_tokens).append(value)
            end = match.end()
        # Keep a trailing partial token ("<|bicodec_sem") for the next chunk.
        tail = buffer[end:]
        start = tail.rfind("<")
        self._pending = tail[start:] if start != -1 and "|>" not in tail[start:] else ""
        return delta


def token_delta_from_ids(ids: list[int], token_map: TokenMap) -> TokenDelta:
    delta = TokenDelta()
    for token in ids:
        if 0 <= token - token_map.semantic_base < token_map.semantic_size:
            delta.semantic.append(token - token_map.semantic_base)
        elif 0 <= token - token_map.global_base < token_map.global_size:
            delta.global_tokens.append(token - token_map.global_base)
    return delta


class LLMClient:
    """The gateway's one connection pool to vLLM."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        timeout_s: float = 30.0,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.on_abort = on_abort  # called when a stream is closed before vLLM finished it
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.token_map = TokenMap()
        self.token_map_checked = False
        self.max_model_len: int | None = None  # vLLM's context length, from /tokenize
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        # The openai client insists on a key; vLLM without --api-key ignores it.
        self.client = AsyncOpenAI(
            base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0
        )
        self.http = httpx.AsyncClient(
            base_url=self.root_url,
            timeout=httpx.Timeout(5.0),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()

    async def health(self) -> str | None:
        """None when vLLM answers ``/health`` with 200, else the reason."""
        try:
            response = await self.http.get("/health")
        except httpx.HTTPError as err:
            return f"vLLM at {self.root_url} is unreachable ({type(err).__name__})"
        if response.status_code != 200:
            return f"vLLM /health answered {response.status_code}"
        return None

    async def check_token_map(self) -> TokenMap:
        """Read the Spark token ids (and the context length) off vLLM's ``POST /tokenize``."""
        names = [
            "<|bicodec_global_0|>",
            "<|bicodec_semantic_0|>",
            "<|bicodec_semantic_8191|>",
            "<|end_semantic_token|>",
            "<|im_end|>",
        ]
        try:
            response = await self.http.post(
                "/tokenize",
                json={"model": self.model, "prompt": "".join(names), "add_special_tokens": False},
            )
            response.raise_for_status()
            answer = response.json()
            tokens = answer["tokens"]
            self.max_model_len = answer.get("max_model_len")
        except (httpx.HTTPError, KeyError, ValueError) as err:
            raise UpstreamUnavailable(f"could not read token ids from vLLM: {err}") from err
        if len(tokens) != len(names) or tokens[2] - tokens[1] != 8191:
            raise UpstreamError(
                f"vLLM's tokenizer for {self.model!r} does not hold the Spark-TTS tokens "
                f"(/tokenize gave {tokens}): is MODEL_NAME a Spark-TTS model?"
            )
        global_base, semantic_base, _, end_semantic, im_end = tokens
        self.token_map = TokenMap(global_base, semantic_base, end_semantic, im_end)
        self.token_map_checked = True
        if self.token_map != TokenMap():
            logger.warning("Spark token ids differ from upstream's: %s", self.token_map)
        return self.token_map

    async def token_ids(self, names: Sequence[str]) -> dict[str, int]:
        """The vocabulary id of each of ``names`` (token strings such as
        ``<|start_global_token|>``) that vLLM's tokenizer holds as one token; a name it
        would spell in several tokens is left out. One ``POST /tokenize`` per name.

        Raises UpstreamUnavailable when vLLM does not answer.
        """

        async def one(name: str) -> list[int]:
            response = await self.http.post(
                "/tokenize",
                json={"model": self.model, "prompt": name, "add_special_tokens": False},
            )
            response.raise_for_status()
            tokens = response.json()["tokens"]
            if not isinstance(tokens, list):
                raise ValueError(f"/tokenize gave {tokens!r}")
            return tokens

        try:
            answers = await asyncio.gather(*(one(name) for name in names))
        except (httpx.HTTPError, KeyError, ValueError) as err:
            raise UpstreamUnavailable(f"could not read token ids from vLLM: {err}") from err
        return {
            name: tokens[0]
            for name, tokens in zip(names, answers, strict=True)
            if len(tokens) == 1 and isinstance(tokens[0], int)
        }

    async def stream_tokens(
        self,
        prompt: str,
        sampling: SamplingParams,
        request_id: str | None = None,
        priority: int | None = None,
        seed: int | None = None,
        structured_outputs: Mapping[str, object] | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Yield the BiCodec tokens of one completion as they arrive.

        ``priority``: vLLM's request priority (lower: sooner), only for a vLLM started
        with ``--scheduling-policy priority`` (any other refuses it); None: not sent.
        ``seed``: the sampling seed (the same seed and prompt sample alike); None: not sent.
        ``structured_outputs``: vLLM's ``structured_outputs`` object (e.g. ``{"grammar":
        ...}``, :mod:`decoder_gateway.llm.grammar`), which constrains what the model may
        write; None: not sent.

        Raises UpstreamUnavailable (cannot connect), UpstreamError (vLLM error, in
        band or by status, or a stream that breaks off).
        """
        if not self.token_map_checked:  # vLLM was away at start-up: check before use
            with contextlib.suppress(UpstreamUnavailable):
                await self.check_token_map()
        extra_body: dict[str, object] = {
            "top_k": sampling.top_k,
            "min_p": 0.0,
            "repetition_penalty": sampling.repetition_penalty,
            "stop_token_ids": self.token_map.stop_token_ids,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "return_token_ids": True,
        }
        if request_id:
            extra_body["request_id"] = request_id
        if priority is not None:
            extra_body["priority"] = priority
        if structured_outputs is not None:
            extra_body["structured_outputs"] = dict(structured_outputs)
        try:
            stream = await self.client.completions.create(
                model=self.model,
                prompt=prompt,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=seed if seed is not None else openai.omit,
                extra_body=extra_body,
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise UpstreamUnavailable(f"cannot reach vLLM at {self.base_url}: {err}") from err
        except openai.APIStatusError as err:
            if err.status_code in (502, 503, 504):
                raise UpstreamUnavailable(f"vLLM is not ready ({err.status_code})") from err
            raise UpstreamError(
                f"vLLM refused the request ({err.status_code}): {err.message}"
            ) from err

        parser = SparkTextParser()
        finish_reason = None
        completed = False
        try:
            async with stream:  # leaving it closes the response: vLLM aborts the request
                async for chunk in stream:
                    for choice in chunk.choices:
                        ids = getattr(choice, "token_ids", None)
                        if ids is not None:
                            delta = token_delta_from_ids(ids, self.token_map)
                        else:
                            delta = parser.feed(choice.text or "")
                        if delta.semantic or delta.global_tokens:
                            yield delta
                        finish_reason = choice.finish_reason or finish_reason
                completed = True
        except (GeneratorExit, asyncio.CancelledError):
            # Closed by us mid-stream (client gone, error elsewhere): closing the
            # response above made vLLM abort the request.
            if not completed and self.on_abort is not None:
                self.on_abort()
            raise
        except (openai.APIConnectionError, httpx.HTTPError) as err:  # dropped, reset, timed out
            raise UpstreamError(
                f"the connection to vLLM broke off mid-stream ({type(err).__name__})"
            ) from err
        except openai.APIError as err:  # an in-band {"error": ...} event
            raise UpstreamError(f"vLLM failed mid-stream: {err.message}") from err
        if finish_reason is None:
            raise UpstreamError("vLLM's stream ended without finishing the completion")
        if finish_reason == "length":
            logger.info("completion stopped at max_tokens=%d", sampling.max_tokens)
