"""The async gateway client: HTTP speech streams, the two WebSockets, voices, metrics.

One class for every program that talks to a gateway (the command line, the benchmarks,
the load and fault run), so that they share one reading of the wire: how an error body
becomes a message, how a cut-off stream differs from a refused connection.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Origin

from decoder_gateway.client.errors import (
    ClientError,
    ConnectFailed,
    ReplyTimeout,
    ServerError,
    StreamBroken,
)
from decoder_gateway.client.sockets import SAMPLE_RATE, Opening, SpeechSocket, TextInSocket

DEFAULT_URL = "http://localhost:8001"
SPEECH_STREAM_PATH = "/v1/audio/speech/stream"  # POST: PCM as it is made
OPENAI_SPEECH_PATH = "/v1/audio/speech"
SPEECH_WS_PATH = "/v1/audio/speech/stream/ws"  # the seed WebSocket
TEXT_IN_WS_PATH = "/v1/audio/speech/stream"  # the streaming-text WebSocket
VOICES_PATH = "/v1/audio/voices"
METRICS_PATH = "/metrics"
WS_MAX_FRAME_BYTES = 16 << 20  # far over any audio frame the gateway sends
WS_CLOSE_TIMEOUT_S = 2.0  # the gateway answers a close at once


def endpoint(base_url: str, path: str, websocket: bool) -> str:
    """``http(s)://`` or ``ws(s)://`` base URL (any path prefix kept) -> the endpoint."""
    parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    secure = parts.scheme in ("https", "wss")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ClientError(f"unsupported URL scheme {parts.scheme!r} in {base_url!r}")
    scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


class SpeechResponse:
    """A streaming speech answer whose status was 200: read it as raw chunks or as
    server-sent events, once."""

    def __init__(self, client: GatewayClient, response: httpx.Response, url: str) -> None:
        self._client = client
        self._response = response
        self.url = url
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "")
        self.sample_rate = int(response.headers.get("X-Sample-Rate", SAMPLE_RATE))
        self.received = 0  # bytes of the body so far

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (for a PCM stream, as the gateway sends it)."""
        try:
            async for chunk in self._response.aiter_raw():
                if chunk:
                    self.received += len(chunk)
                    yield chunk
        except httpx.HTTPError as err:
            raise self._client._failure(err, self.url, self.received) from err

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The JSON ``data`` of each server-sent event (``stream_format: sse``)."""
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = _json_object(line[5:])
                if event is None:
                    raise ClientError(f"{self.url}: SSE data that is not a JSON object: {line!r}")
                yield event
        except httpx.HTTPError as err:
            raise self._client._failure(err, self.url, self.received) from err


class GatewayClient:
    """A gateway at ``base_url`` (``http(s)://`` or ``ws(s)://``, any path prefix kept).

    ``api_key`` goes as ``Authorization: Bearer`` on every request and handshake.
    ``timeout_s``: the longest wait for the server's next bytes (None: no limit, for a
    caller that bounds each request itself); ``connect_timeout_s``: for a connection or
    a handshake (default: ``timeout_s``); ``max_connections``: the HTTP pool's size
    (default: httpx's). ``async with`` closes the pool, which opens on the first HTTP
    request. Failures raise :class:`~decoder_gateway.client.errors.ClientError`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        connect_timeout_s: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.base_url = base_url
        self.http_url = endpoint(base_url, "", websocket=False)  # a bad scheme fails here
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.max_connections = max_connections
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _pool(self) -> httpx.AsyncClient:
        """The HTTP pool, opened on first use."""
        if self._http is None:
            limits = httpx.Limits()
            if self.max_connections is not None:
                limits = httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                )
            self._http = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=limits,
            )
        return self._http

    def url(self, path: str) -> str:
        return self.http_url + path

    # -- HTTP ------------------------------------------------------------------------

    def speech_stream(
        self, text: str, **options: Any
    ) -> AbstractAsyncContextManager[SpeechResponse]:
        """``POST /v1/audio/speech/stream``: ``async with`` it for the PCM answer.

        ``options``: the request's optional fields (voice, speaker_id, temperature,
        max_tokens, ...); None leaves the server's default.
        """
        fields = {key: value for key, value in options.items() if value is not None}
        return self.post_stream(SPEECH_STREAM_PATH, {"text": text, **fields})

    @asynccontextmanager
    async def post_stream(
        self, path: str, body: Mapping[str, Any] | bytes
    ) -> AsyncIterator[SpeechResponse]:
        """POST ``body`` (a mapping as JSON, bytes as they are, typed JSON) to a speech
        endpoint and hold the answer open while the block reads it.

        Any status but 200 raises :class:`ServerError` (with the body); leaving the
        block early closes the connection, which tells the gateway the client went.
        """
        url = self.url(path)
        kwargs: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        http = self._pool()
        try:
            response = await http.send(http.build_request("POST", url, **kwargs), stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise self._failure(err, url, None) from err
        try:
            if response.status_code != 200:
                try:
                    await response.aread()
                except httpx.HTTPError as err:
                    raise self._failure(err, url, None) from err
                raise ServerError.from_response(response)
            yield SpeechResponse(self, response, url)
        finally:
            await response.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One whole request; an answer that is not a success raises :class:`ServerError`."""
        url = self.url(path)
        try:
            response = await self._pool().request(method, url, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise self._failure(err, url, None) from err
        if not response.is_success:
            raise ServerError.from_response(response)
        return response

    async def _request_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One whole request whose answer must be a JSON object."""
        response = await self._request(method, path, **kwargs)
        try:
            reply = response.json()
        except ValueError as err:
            raise ClientError(f"{method} {response.url}: the reply is not JSON") from err
        if not isinstance(reply, dict):
            raise ClientError("unexpected reply from the server (not a JSON object)")
        return reply

    def _failure(self, err: Exception, url: str, received: int | None) -> ClientError:
        """``err`` of httpx as a :class:`ClientError`; ``received``: bytes of the answer's
        body so far (None: no answer began)."""
        if isinstance(err, httpx.ConnectError):
            return ConnectFailed(f"cannot connect to {url}: {err}")
        if isinstance(err, httpx.TimeoutException):
            connecting = isinstance(err, httpx.ConnectTimeout)
            limit = self.connect_timeout_s if connecting else self.timeout_s
            return ReplyTimeout(f"no reply from the server for {limit:g} s")
        if received is None:
            message = f"request to {url} failed: {err}"
        else:  # after the first byte a failure can only break the body off
            message = (
                f"the stream broke off after {received} bytes of audio ({err}); "
                "the server failed mid-stream"
            )
        if isinstance(err, httpx.RemoteProtocolError):  # the server closed it unfinished
            return StreamBroken(message, received=received, detail=str(err))
        return ClientError(message)

    # -- WebSockets ------------------------------------------------------------------

    def speech_socket(self, origin: str | None = None) -> Opening[SpeechSocket]:
        """The seed WebSocket (``/v1/audio/speech/stream/ws``): ``await`` it, or
        ``async with`` it. ``origin``: the handshake's Origin header."""

        async def open_session() -> SpeechSocket:
            return SpeechSocket(await self._connect(SPEECH_WS_PATH, origin), self.timeout_s)

        return Opening(open_session)

    def text_in_socket(self, origin: str | None = None) -> Opening[TextInSocket]:
        """The streaming-text WebSocket (``/v1/audio/speech/stream``), as above."""

        async def open_session() -> TextInSocket:
            return TextInSocket(await self._connect(TEXT_IN_WS_PATH, origin), self.timeout_s)

        return Opening(open_session)

    async def _connect(self, path: str, origin: str | None) -> ClientConnection:
        url = endpoint(self.base_url, path, websocket=True)
        try:
            return await connect(
                url,
                additional_headers=self.headers,
                origin=Origin(origin) if origin else None,
                open_timeout=self.connect_timeout_s,
                close_timeout=WS_CLOSE_TIMEOUT_S,
                ping_interval=None,  # the gateway pings; a silent wait is bounded by timeout_s
                max_size=WS_MAX_FRAME_BYTES,
                compression=None,  # PCM does not compress: save both ends the work
            )
        except InvalidStatus as err:
            answer = err.response
            raise ServerError.from_http(
                answer.status_code,
                answer.reason_phrase,
                answer.body or b"",
                answer.headers.get("Retry-After"),
            ) from err
        except (OSError, InvalidHandshake, InvalidURI) as err:
            raise ConnectFailed(f"cannot connect to {url}: {err}") from err

    # -- voices and metrics ------------------------------------------------------------

    async def list_voices(self) -> list[dict[str, Any]]:
        """Every voice, packaged and cloned (``GET /v1/audio/voices``)."""
        return _field(await self._request_json("GET", VOICES_PATH), "voices")

    async def add_voice(
        self,
        name: str,
        audio: bytes,
        filename: str,
        *,
        media_type: str | None = None,
        **fields: str | None,
    ) -> dict[str, Any]:
        """Clone a voice from a reference clip (``POST /v1/audio/voices``); the new voice.

        ``media_type``: the clip's (default: guessed from ``filename``); ``fields``: the
        form's other fields (language, gender, consent, ...); None ones are left out.
        """
        kind = media_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form = {key: value for key, value in fields.items() if value is not None}
        reply = await self._request_json(
            "POST",
            VOICES_PATH,
            files={"audio_sample": (filename, audio, kind)},
            data={"name": name, **form},
        )
        return _field(reply, "voice")

    async def save_voice(
        self, name: str, global_tokens: list[int], **fields: str | None
    ) -> dict[str, Any]:
        """Save a voice given by its 32 global tokens (``POST /v1/audio/voices`` with
        JSON): a designed candidate, or a voice made elsewhere. ``fields``: gender,
        speaker_description, language, consent, base_voice; None ones are left out."""
        body = {key: value for key, value in fields.items() if value is not None}
        reply = await self._request_json(
            "POST", VOICES_PATH, json={"name": name, "global_tokens": global_tokens, **body}
        )
        return _field(reply, "voice")

    async def design_voices(
        self,
        gender: str,
        pitch: str,
        speed: str,
        *,
        text: str | None = None,
        candidates: int | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Candidate voices for the style labels (``POST /v1/audio/voices/design``), each
        ``{"global_tokens", "audio" (a WAV data URL), "duration_s"}``; the server must run
        with VOICE_DESIGN=on (else 501)."""
        options = {"text": text, "candidates": candidates, "seed": seed}
        body = {key: value for key, value in options.items() if value is not None}
        reply = await self._request_json(
            "POST",
            f"{VOICES_PATH}/design",
            json={"gender": gender, "pitch": pitch, "speed": speed, **body},
        )
        return _field(reply, "candidates")

    async def delete_voice(self, name: str) -> dict[str, Any]:
        """Delete a cloned voice (``DELETE /v1/audio/voices/NAME``); the server's reply."""
        return await self._request_json("DELETE", f"{VOICES_PATH}/{quote(name, safe='')}")

    async def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        return (await self._request("GET", METRICS_PATH)).text


def _json_object(raw: bytes | str) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _field(reply: dict[str, Any], key: str) -> Any:
    if key not in reply:
        raise ClientError(f"unexpected reply from the server (no {key!r})")
    return reply[key]
