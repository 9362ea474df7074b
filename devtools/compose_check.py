"""What scripts/compose_check.sh asks of the stack it started, through the published port.

Each subcommand talks to a gateway at ``URL`` with the project's own client
(:mod:`decoder_gateway.client`) and prints one line per check, ``PASS: name: detail`` or
``FAIL: name: reason``, and ``NUMBER: what: value`` for the figures the script reports;
it exits 1 when a check failed. The script counts those lines.

    python -m devtools.compose_check speak URL --clip CLIP --voice-name NAME --save FILE
    python -m devtools.compose_check cloned-voice URL --voice-name NAME --expect FILE
    python -m devtools.compose_check first-audio URL --label stack
    python -m devtools.compose_check kill-llm URL -- docker kill CONTAINER
    python -m devtools.compose_check native --llm-dir DIR --bicodec-dir DIR
    python -m devtools.compose_check wheel-index DIR

``native`` measures first audio the same way on the test environments (the vLLM CPU
build of ``.venv-vllm`` and the gateway of ``.venv``, as the test suite runs them), so
the stack's figure has one to be read against. ``wheel-index`` turns a folder of wheels
(``DIR/files``) into a PEP 503 index (``DIR/simple``) that ``python -m http.server``
can serve to pip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from decoder_gateway.client import ClientError, GatewayClient, ServerError, StreamBroken

TEXT = "Oli otya? Nze bulungi."
VOICE = "luganda_female"
# Long enough to still be speaking when the LLM is killed after the first audio.
LONG_TEXT = " ".join(f"Sentensi ey'okugezesa namba {n}." for n in range(1, 41))
SAMPLE_WIDTH = 2
REQUEST_TIMEOUT_S = 120.0


class Report:
    """PASS / FAIL / NUMBER lines on stdout, and whether anything failed."""

    def __init__(self) -> None:
        self.failed = False

    def ok(self, name: str, detail: str) -> None:
        print(f"PASS: {name}: {detail}", flush=True)

    def fail(self, name: str, reason: str) -> None:
        self.failed = True
        print(f"FAIL: {name}: {reason}", flush=True)

    def number(self, what: str, value: str) -> None:
        print(f"NUMBER: {what}: {value}", flush=True)

    async def check(self, name: str, run: Callable[[], Awaitable[str]]) -> bool:
        """Run one check; its return value is the PASS line's detail."""
        try:
            detail = await run()
        except (
            ClientError,
            httpx.HTTPError,
            CheckError,
            TimeoutError,
            OSError,
            subprocess.CalledProcessError,
        ) as err:
            self.fail(name, f"{type(err).__name__}: {err}")
            return False
        self.ok(name, detail)
        return True

    def exit_code(self) -> int:
        return 1 if self.failed else 0


class CheckError(Exception):
    """A reply that came but was not what the check wants."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


# ----------------------------------------------------------------------------- requests


async def health(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.get(f"{url}/health")
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:200]}
    return response.status_code, body if isinstance(body, dict) else {"raw": body}


async def wait_health(url: str, status: int, timeout_s: float) -> tuple[float, dict[str, Any]]:
    """Seconds until /health answers ``status`` (a refused connection counts as none)."""
    start = time.monotonic()
    while True:
        try:
            code, body = await health(url)
        except httpx.HTTPError:
            code, body = 0, {}
        if code == status:
            return time.monotonic() - start, body
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"/health did not answer {status} within {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def stream_pcm(client: GatewayClient, text: str, voice: str) -> tuple[float, bytes]:
    """(seconds to the first audio byte, the whole PCM) of POST /v1/audio/speech/stream."""
    start = time.perf_counter()
    first: float | None = None
    audio = bytearray()
    async with client.speech_stream(text, voice=voice) as answer:
        async for chunk in answer.chunks():
            if first is None:
                first = time.perf_counter() - start
            audio += chunk
    require(first is not None and len(audio) > 0, "no audio in the answer")
    require(len(audio) % SAMPLE_WIDTH == 0, f"{len(audio)} bytes is not whole PCM16 samples")
    assert first is not None
    return first, bytes(audio)


async def openai_speech(url: str, response_format: str) -> tuple[str, bytes]:
    body = {"model": "tts", "input": TEXT, "voice": VOICE, "response_format": response_format}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        response = await http.post(f"{url}/v1/audio/speech", json=body)
    require(response.status_code == 200, f"HTTP {response.status_code}: {response.text[:300]}")
    return response.headers.get("content-type", ""), response.content


async def run_command(argv: Sequence[str]) -> None:
    """Run ``argv``; a failure raises CalledProcessError."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, list(argv), output)


def is_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync at the start."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


# ----------------------------------------------------------------------------- subcommands


async def speak(args: argparse.Namespace, report: Report) -> None:
    """Every way in: /health, the PCM stream, /v1/audio/speech (WAV, mp3), both
    WebSockets, and a voice cloned by upload."""
    url = args.url
    async with GatewayClient(url, timeout_s=REQUEST_TIMEOUT_S) as client:

        async def check_health() -> str:
            code, body = await health(url)
            require(code == 200 and body.get("status") == "ok", f"HTTP {code}: {body}")
            return f"status ok, model {body.get('model')!r}"

        async def check_stream() -> str:
            first, audio = await stream_pcm(client, TEXT, VOICE)
            samples = len(audio) // SAMPLE_WIDTH
            return f"{len(audio)} bytes ({samples / 16000:.2f} s), first audio {first:.2f} s"

        async def check_wav() -> str:
            kind, data = await openai_speech(url, "wav")
            require(kind.startswith("audio/wav"), f"content-type {kind!r}")
            require(data[:4] == b"RIFF" and data[8:12] == b"WAVE", "no RIFF/WAVE header")
            require(b"data" in data[12:256] and len(data) > 1000, f"{len(data)} bytes")
            return f"{len(data)} bytes of {kind}"

        async def check_mp3() -> str:
            kind, data = await openai_speech(url, "mp3")
            require(kind.startswith("audio/mpeg"), f"content-type {kind!r}")
            require(is_mp3(data) and len(data) > 500, f"not an mp3 ({len(data)} bytes)")
            return f"{len(data)} bytes of {kind}"

        async def check_seed_socket() -> str:
            async with client.speech_socket() as socket:
                audio = b"".join([chunk async for chunk in socket.speak(TEXT, voice=VOICE)])
            require(len(audio) > 0, "no audio")
            return f"{len(audio)} bytes, end frame's sample count matches"

        async def check_text_socket() -> str:
            audio = bytearray()
            sentences = 0
            async with client.text_in_socket() as socket:
                await socket.configure(voice=VOICE, response_format="pcm", stream_audio=True)
                for fragment in ("Oli ot", "ya? Nze bu", "lungi."):
                    await socket.write(fragment)
                await socket.done()
                async for frame in socket.frames():
                    if isinstance(frame, bytes):
                        audio += frame
                    elif frame.get("type") == "error" or frame.get("error") is True:
                        raise CheckError(f"error frame {frame}")
                    elif frame.get("type") == "audio.done":
                        sentences += 1
            require(sentences == 2 and len(audio) > 0, f"{sentences} sentences, {len(audio)} B")
            return f"{len(audio)} bytes in {sentences} sentences from 3 fragments"

        async def check_clone() -> str:
            names = {voice["id"] for voice in await client.list_voices()}
            if args.voice_name in names:  # left by an earlier run on the same volume
                await client.delete_voice(args.voice_name)
            clip = Path(args.clip)
            data = await asyncio.to_thread(clip.read_bytes)
            voice = await client.add_voice(
                args.voice_name, data, clip.name, consent="compose check"
            )
            tokens = voice.get("global_tokens")
            require(isinstance(tokens, list) and len(tokens) == 32, f"voice {voice}")
            await asyncio.to_thread(Path(args.save).write_text, json.dumps(tokens))
            _, audio = await stream_pcm(client, TEXT, args.voice_name)
            return f"{args.voice_name!r} cloned from {clip.name}, spoke {len(audio)} bytes"

        await report.check("/health", check_health)
        await report.check("PCM stream (POST /v1/audio/speech/stream)", check_stream)
        await report.check("/v1/audio/speech as WAV", check_wav)
        await report.check("/v1/audio/speech as mp3", check_mp3)
        await report.check("seed WebSocket", check_seed_socket)
        await report.check("streaming-text WebSocket", check_text_socket)
        await report.check("voice cloned by upload", check_clone)


async def cloned_voice(args: argparse.Namespace, report: Report) -> None:
    """The voice cloned before is still listed, with its tokens, and speaks."""

    async def check() -> str:
        expected = json.loads(await asyncio.to_thread(Path(args.expect).read_text))
        async with GatewayClient(args.url, timeout_s=REQUEST_TIMEOUT_S) as client:
            listed = {voice["id"] for voice in await client.list_voices()}
            require(args.voice_name in listed, f"{args.voice_name!r} is gone: {sorted(listed)}")
            async with httpx.AsyncClient(timeout=30.0) as http:
                answer = await http.get(f"{args.url}/v1/audio/voices/{args.voice_name}")
            require(answer.status_code == 200, f"GET the voice: HTTP {answer.status_code}")
            tokens = answer.json().get("voice", {}).get("global_tokens")
            require(tokens == expected, f"its tokens changed: {tokens} != {expected}")
            _, audio = await stream_pcm(client, TEXT, args.voice_name)
        return f"{args.voice_name!r} listed, same 32 tokens, spoke {len(audio)} bytes"

    await report.check("cloned voice after `docker compose restart gateway`", check)


async def measure_first_audio(url: str, runs: int) -> list[float]:
    """Seconds to the first audio of the PCM stream, ``runs`` times after one warm-up."""
    times = []
    async with GatewayClient(url, timeout_s=REQUEST_TIMEOUT_S) as client:
        for run in range(runs + 1):
            first, _ = await stream_pcm(client, TEXT, VOICE)
            if run:
                times.append(first)
    return times


def first_audio_figure(times: Sequence[float]) -> str:
    return (
        f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, "
        f"{len(times)} requests after one warm-up, {TEXT!r})"
    )


async def first_audio(args: argparse.Namespace, report: Report) -> None:
    try:
        times = await measure_first_audio(args.url, args.runs)
    except (ClientError, httpx.HTTPError, CheckError) as err:
        report.fail(f"first audio ({args.label})", str(err))
        return
    report.number(f"first audio, {args.label}", first_audio_figure(times))


async def kill_llm(args: argparse.Namespace, report: Report) -> None:
    """The LLM killed while a seed WebSocket speaks: that client gets an error frame,
    /health says the LLM is down, and once it is back the gateway speaks again."""
    url = args.url
    before = time.monotonic()

    async def check_error() -> str:
        received = 0
        killed = False
        async with GatewayClient(url, timeout_s=REQUEST_TIMEOUT_S) as client:
            async with client.speech_socket() as socket:
                try:
                    async for chunk in socket.speak(LONG_TEXT, voice=VOICE):
                        received += len(chunk)
                        if not killed:
                            killed = True
                            await run_command(args.kill)
                except ServerError as err:
                    require(killed, f"error before any audio: {err}")
                    return f"error frame after {received} bytes: {err}"
                except StreamBroken as err:
                    raise CheckError(f"connection dropped without an error frame: {err}") from err
        raise CheckError(f"the whole text was spoken ({received} bytes): nothing was killed")

    async def check_health_down() -> str:
        _, body = await wait_health(url, 503, timeout_s=60.0)
        return f"503, reason {body.get('reason')!r}"

    async def check_recovered() -> str:
        await wait_health(url, 200, timeout_s=args.recover_timeout)
        async with GatewayClient(url, timeout_s=REQUEST_TIMEOUT_S) as client:
            _, audio = await stream_pcm(client, TEXT, VOICE)
        waited = time.monotonic() - before
        return f"/health 200 and {len(audio)} bytes spoken, {waited:.0f} s after the kill"

    if await report.check("LLM killed mid-stream: the client gets an error", check_error):
        await report.check("LLM killed: /health says it is down", check_health_down)
        await report.check("LLM back (restart policy): the gateway speaks again", check_recovered)


def native(args: argparse.Namespace, report: Report) -> None:
    """First audio on the test environments: vLLM from .venv-vllm, the gateway from this
    venv, the same tiny LM and BiCodec as the stack, on loopback."""
    from devtools.gateway_server import GatewayServer
    from devtools.process import ServerStartError
    from devtools.vllm_server import VllmServer

    with tempfile.TemporaryDirectory(prefix="compose-check-native-") as tmp:
        logs = Path(tmp)
        try:
            with (
                VllmServer(
                    args.llm_dir,
                    logs / "vllm.log",
                    served_model_name="tiny-spark",
                    max_model_len=4096,
                    start_timeout_s=900.0,
                ) as vllm,
                GatewayServer(
                    vllm.base_url,
                    logs,
                    start_timeout_s=300.0,
                    BICODEC_DIR=str(args.bicodec_dir),
                    MODEL_NAME="tiny-spark",
                ) as gateway,
            ):
                times = asyncio.run(measure_first_audio(gateway.url, args.runs))
        except (ServerStartError, ClientError, httpx.HTTPError, CheckError) as err:
            report.fail("first audio (test venv)", str(err))
            return
    report.number("first audio, test venv", first_audio_figure(times))


def wheel_index(folder: Path) -> int:
    """``folder/simple/<project>/`` holding links to ``folder/files/*.whl``; the count."""
    files = sorted((folder / "files").glob("*.whl"))
    simple = folder / "simple"
    projects: set[str] = set()
    for wheel in files:
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()
        target = simple / project / wheel.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to(Path("..", "..", "files", wheel.name))
        projects.add(project)
    return len(projects)


# ----------------------------------------------------------------------------- command line


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.compose_check", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    speak_cmd = commands.add_parser("speak", help="every way in, and a cloned voice")
    speak_cmd.add_argument("url")
    speak_cmd.add_argument("--clip", required=True, type=Path)
    speak_cmd.add_argument("--voice-name", required=True)
    speak_cmd.add_argument("--save", required=True, type=Path, help="the voice's tokens go here")
    voice_cmd = commands.add_parser("cloned-voice", help="the cloned voice is still there")
    voice_cmd.add_argument("url")
    voice_cmd.add_argument("--voice-name", required=True)
    voice_cmd.add_argument("--expect", required=True, type=Path)
    first_cmd = commands.add_parser("first-audio", help="seconds to the first audio")
    first_cmd.add_argument("url")
    first_cmd.add_argument("--label", default="stack")
    first_cmd.add_argument("--runs", type=int, default=5)
    kill_cmd = commands.add_parser("kill-llm", help="kill the LLM while a stream plays")
    kill_cmd.add_argument("url")
    kill_cmd.add_argument("--recover-timeout", type=float, default=600.0)
    kill_cmd.add_argument("kill", nargs="+", help="the command that kills the LLM")
    native_cmd = commands.add_parser("native", help="first audio on the test venvs")
    native_cmd.add_argument("--llm-dir", required=True, type=Path)
    native_cmd.add_argument("--bicodec-dir", required=True, type=Path)
    native_cmd.add_argument("--runs", type=int, default=5)
    index_cmd = commands.add_parser("wheel-index", help="a PEP 503 index of DIR/files")
    index_cmd.add_argument("folder", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    report = Report()
    if args.command == "wheel-index":
        print(f"{wheel_index(args.folder)} projects in {args.folder / 'simple'}")
        return 0
    if args.command == "native":
        native(args, report)
        return report.exit_code()
    if hasattr(args, "url"):
        args.url = args.url.rstrip("/")
    commands = {
        "speak": speak,
        "cloned-voice": cloned_voice,
        "first-audio": first_audio,
        "kill-llm": kill_llm,
    }
    asyncio.run(commands[args.command](args, report))
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
