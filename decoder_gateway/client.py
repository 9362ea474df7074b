"""Command-line client: speak text with a running gateway, save WAV or raw PCM16.

    python -m decoder_gateway.client "Oli otya?" --voice luganda_female -o out.wav
    echo "Habari yako?" | python -m decoder_gateway.client - --voice swahili_male -o hi.wav
    python -m decoder_gateway.client -f story.txt --http --format pcm -o - | \\
        aplay -q -f S16_LE -r 16000 -c 1

It streams over the WebSocket (``--ws``, the default) or ``POST /v1/audio/speech/stream``
(``--http``), shows the audio received so far on stderr, and ends with the time to first
audio and the real-time factor (synthesis time / audio duration). Raw PCM to stdout
(``--format pcm -o -``) is written as it arrives, so it can be played live; files are
written once the audio is complete, so a failed request leaves no truncated file.
Exit status: 0 on success, 1 when the server or the connection fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

DEFAULT_URL = "http://localhost:8001"
SAMPLE_RATE = 16000  # PCM16 LE mono; the server also says so in its start frame / headers
SAMPLE_WIDTH = 2
WS_PATH = "/v1/audio/speech/stream/ws"
HTTP_PATH = "/v1/audio/speech/stream"


class ClientError(Exception):
    """A failure to report on stderr (the server's own message where it sent one)."""


@dataclass
class SpeechRequest:
    text: str
    voice: str | None = None
    speaker_id: int | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def options(self) -> dict[str, object]:
        """The optional fields that were given; the server's defaults stand for the rest."""
        fields = {
            "voice": self.voice,
            "speaker_id": self.speaker_id,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        return {key: value for key, value in fields.items() if value is not None}


def endpoint(base_url: str, path: str, websocket: bool) -> str:
    """``http(s)://`` or ``ws(s)://`` base URL (any path prefix kept) -> the endpoint."""
    parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    secure = parts.scheme in ("https", "wss")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ClientError(f"unsupported URL scheme {parts.scheme!r} in {base_url!r}")
    scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


class WebSocketSpeech:
    """One synthesis over ``WS /v1/audio/speech/stream/ws``; iterating yields PCM chunks."""

    transport = "WebSocket"

    def __init__(self, base_url: str, request: SpeechRequest, timeout_s: float) -> None:
        self.url = endpoint(base_url, WS_PATH, websocket=True)
        self.request = request
        self.timeout_s = timeout_s
        self.sample_rate = SAMPLE_RATE

    def __iter__(self) -> Iterator[bytes]:
        message = {
            "input": self.request.text,
            **self.request.options(),
            "segment_id": 1,
            "continue": False,  # the only message on this connection
        }
        try:
            ws = connect(self.url, open_timeout=self.timeout_s, max_size=16 << 20, compression=None)
        except (OSError, InvalidHandshake, InvalidURI) as err:
            raise ClientError(f"cannot connect to {self.url}: {err}") from err
        with ws:
            yield from self._exchange(ws, json.dumps(message))

    def _exchange(self, ws: ClientConnection, message: str) -> Iterator[bytes]:
        samples = 0
        while True:
            try:
                if message:
                    ws.send(message)
                    message = ""
                frame = ws.recv(timeout=self.timeout_s)
            except TimeoutError as err:
                raise ClientError(f"no reply from the server for {self.timeout_s:g} s") from err
            except ConnectionClosed as err:
                raise ClientError(
                    f"the server closed the connection before the end of the audio ({err})"
                ) from err
            if isinstance(frame, bytes):
                samples += len(frame) // SAMPLE_WIDTH
                yield frame
                continue
            reply = json.loads(frame)
            kind = reply.get("type")
            if kind == "start":
                self.sample_rate = int(reply.get("sample_rate", SAMPLE_RATE))
            elif kind == "error":
                code = f" ({reply['code']})" if reply.get("code") else ""
                raise ClientError(f"server error: {reply.get('message')}{code}")
            elif kind == "end":
                if reply.get("samples") != samples:
                    raise ClientError(
                        f"received {samples} samples, the server says it sent {reply['samples']}"
                    )
                return


class HttpSpeech:
    """One synthesis over ``POST /v1/audio/speech/stream``; iterating yields PCM chunks."""

    transport = "HTTP"

    def __init__(self, base_url: str, request: SpeechRequest, timeout_s: float) -> None:
        self.url = endpoint(base_url, HTTP_PATH, websocket=False)
        self.request = request
        self.timeout_s = timeout_s
        self.sample_rate = SAMPLE_RATE

    def __iter__(self) -> Iterator[bytes]:
        body = {"text": self.request.text, **self.request.options()}
        received: int | None = None  # bytes of audio, once the response has started
        try:
            with (
                httpx.Client(timeout=self.timeout_s) as client,
                client.stream("POST", self.url, json=body) as response,
            ):
                if response.status_code != 200:
                    response.read()
                    raise ClientError(
                        f"server error: {error_message(response)} (HTTP {response.status_code})"
                    )
                self.sample_rate = int(response.headers.get("X-Sample-Rate", SAMPLE_RATE))
                received = 0
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    yield chunk
        except httpx.ConnectError as err:
            raise ClientError(f"cannot connect to {self.url}: {err}") from err
        except httpx.TimeoutException as err:
            raise ClientError(f"no reply from the server for {self.timeout_s:g} s") from err
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            if received is None:
                raise ClientError(f"request to {self.url} failed: {err}") from err
            # After the first byte a failure can only break the chunked body off.
            raise ClientError(
                f"the stream broke off after {received} bytes of audio ({err}); "
                "the server failed mid-stream"
            ) from err


def error_message(response: httpx.Response) -> str:
    """The message of the gateway's ``{"error": {"message": ...}}`` body, or the raw text."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason_phrase


class Progress:
    """Audio received so far on stderr: a live line on a terminal, a summary always."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.live = not quiet and stream.isatty()
        self.started = time.perf_counter()
        self.first_audio: float | None = None
        self.bytes = 0
        self.sample_rate = SAMPLE_RATE
        self._shown = 0.0

    def audio(self, size: int, sample_rate: int) -> None:
        now = time.perf_counter()
        if self.first_audio is None:
            self.first_audio = now
        self.bytes += size
        self.sample_rate = sample_rate
        if self.live and now - self._shown >= 0.1:
            self._shown = now
            self._show()

    def _show(self) -> None:
        seconds = self.bytes / SAMPLE_WIDTH / self.sample_rate
        self.stream.write(f"\rreceived {self.bytes:>10,} bytes, {seconds:7.2f} s of audio")
        self.stream.flush()

    def end_line(self) -> None:
        """Ends the live line, with the final count, before anything else is printed."""
        if self.live and self._shown:
            self._show()
            self.stream.write("\n")
            self._shown = 0.0

    def summary(self, transport: str, output: str) -> None:
        self.end_line()
        if self.quiet:
            return
        sample_rate = self.sample_rate
        elapsed = time.perf_counter() - self.started
        samples = self.bytes // SAMPLE_WIDTH
        duration = samples / sample_rate
        self.stream.write(
            f"received {self.bytes:,} bytes, {duration:.2f} s of audio "
            f"({samples} samples at {sample_rate} Hz) over {transport} in {elapsed:.2f} s"
            f" -> {output}\n"
        )
        ttfa = "n/a" if self.first_audio is None else f"{self.first_audio - self.started:.3f} s"
        rtf = f"{elapsed / duration:.3f}" if duration else "n/a"
        self.stream.write(f"time to first audio: {ttfa}, real-time factor: {rtf}\n")
        self.stream.flush()


def write_wav(target: BinaryIO, pcm: bytes, sample_rate: int) -> None:
    with wave.open(target, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(sample_rate)
        wav.setnframes(len(pcm) // SAMPLE_WIDTH)  # known up front: no seek, stdout works
        wav.writeframes(pcm)


def read_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    if args.file is not None and args.text is not None:
        parser.error("give the text or -f FILE, not both")
    source = args.file if args.file is not None else args.text
    if source is None:
        parser.error("give the text to speak, -f FILE, or - to read stdin")
    if source == "-":
        text = sys.stdin.read()
    elif args.file is not None:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as err:
            parser.error(f"cannot read {source}: {err.strerror}")
    else:
        text = source
    if not text.strip():
        parser.error("the text is empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decoder_gateway.client",
        description="Speak text with a running decoder gateway; save WAV or raw PCM16 "
        "(16 kHz mono, little-endian).",
    )
    parser.add_argument("text", nargs="?", help="the text to speak; - reads stdin")
    parser.add_argument(
        "-f", "--file", metavar="FILE", help="read the text from FILE (UTF-8); - is stdin"
    )
    parser.add_argument("-v", "--voice", help="voice id, e.g. luganda_female (GET /v1/voices)")
    parser.add_argument(
        "--speaker-id", type=int, metavar="ID", help="speaker id, e.g. 248, instead of --voice"
    )
    parser.add_argument(
        "-t", "--temperature", type=float, metavar="T", help="sampling temperature (0-2)"
    )
    parser.add_argument(
        "--max-tokens", type=int, metavar="N", help="semantic-token budget per sentence"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"gateway URL (default {DEFAULT_URL})")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument(
        "--ws", dest="transport", action="store_const", const="ws", help="WebSocket (default)"
    )
    transport.add_argument(
        "--http", dest="transport", action="store_const", const="http", help="HTTP streaming"
    )
    parser.set_defaults(transport="ws")
    # TODO: other formats (mp3, opus, ...) could come from POST /v1/audio/speech's
    # response_format; this client streams PCM and keeps to WAV / raw PCM.
    parser.add_argument(
        "--format", choices=("wav", "pcm"), default="wav", help="output format (default wav)"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file, - for stdout (default speech.wav / speech.pcm)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for the server (default 60)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    request = SpeechRequest(
        text=read_text(args, parser),
        voice=args.voice,
        speaker_id=args.speaker_id,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
    output = args.output or f"speech.{args.format}"
    to_stdout = output == "-"
    live = sys.stdout.buffer if to_stdout and args.format == "pcm" else None
    kind = WebSocketSpeech if args.transport == "ws" else HttpSpeech
    try:
        speech = kind(args.url, request, args.timeout)
    except ClientError as err:
        parser.error(str(err))
    progress = Progress(sys.stderr, args.quiet)
    pcm = bytearray()
    try:
        for chunk in speech:
            progress.audio(len(chunk), speech.sample_rate)
            if live is not None:
                live.write(chunk)
                live.flush()
            else:
                pcm += chunk
    except ClientError as err:
        progress.end_line()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.end_line()
        print("interrupted", file=sys.stderr)
        return 130

    if live is None:
        try:
            if to_stdout:
                write_wav(sys.stdout.buffer, bytes(pcm), speech.sample_rate)
                sys.stdout.buffer.flush()
            elif args.format == "wav":
                with open(output, "wb") as target:
                    write_wav(target, bytes(pcm), speech.sample_rate)
            else:
                Path(output).write_bytes(pcm)
        except OSError as err:
            print(f"error: cannot write {output}: {err.strerror or err}", file=sys.stderr)
            return 1
    progress.summary(speech.transport, "stdout" if to_stdout else output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
