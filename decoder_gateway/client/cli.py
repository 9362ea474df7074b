"""Command-line client: speak text with a running gateway, save WAV or raw PCM16, and
manage cloned voices.

    python -m decoder_gateway.client "Oli otya?" --voice luganda_female -o out.wav
    echo "Habari yako?" | python -m decoder_gateway.client - --voice swahili_male -o hi.wav
    python -m decoder_gateway.client -f story.txt --http --format pcm -o - | \\
        aplay -q -f S16_LE -r 16000 -c 1
    python -m decoder_gateway.client voices add amina clip.wav --language Swahili
    python -m decoder_gateway.client voices list
    python -m decoder_gateway.client "Habari yako?" --voice amina -o amina.wav
    python -m decoder_gateway.client voices rm amina
    python -m decoder_gateway.client voices design --gender female --pitch high --save bright

It streams over the WebSocket (``--ws``, the default) or ``POST /v1/audio/speech/stream``
(``--http``), shows the audio received so far on stderr, and ends with the time to first
audio and the real-time factor (synthesis time / audio duration). Raw PCM to stdout
(``--format pcm -o -``) is written as it arrives, so it can be played live; files are
written once the audio is complete, so a failed request leaves no truncated file.
``voices`` is a subcommand when it is the first argument that is not an option (to
speak the word itself, write ``-- voices``). ``--api-key`` (default: the environment's
``GATEWAY_API_KEY``) is sent as ``Authorization: Bearer``.
Exit status: 0 on success, 1 when the server or the connection fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from decoder_gateway.client.errors import ClientError
from decoder_gateway.client.gateway import DEFAULT_URL, GatewayClient
from decoder_gateway.client.sockets import SAMPLE_RATE, SAMPLE_WIDTH

API_KEY_ENV = "GATEWAY_API_KEY"
TRANSPORT_NAMES = {"ws": "WebSocket", "http": "HTTP"}


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
        epilog="Voices: python -m decoder_gateway.client voices {add,list,rm,design} "
        "(--help for each). To speak the word 'voices' itself, write -- voices.",
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
    add_connection_options(parser)
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
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    return parser


def add_connection_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``--url``, ``--api-key`` and ``--timeout``, shared by every command.

    ``suppress``: no defaults, for a subcommand's copy of the options, so that one given
    before the subcommand is not overwritten by the subcommand's default.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--url", default=default(DEFAULT_URL), help=f"gateway URL (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(os.environ.get(API_KEY_ENV) or None),
        help=f"the gateway's API key, if it has one (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(60.0),
        metavar="SECONDS",
        help="seconds to wait for the server (default 60)",
    )


# -- voices: add, list, rm ----------------------------------------------------------


def build_voices_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decoder_gateway.client voices",
        description="Manage the gateway's voices: clone one from a reference clip, list "
        "them, delete a cloned one. A cloned voice is used by name, like a built-in one: "
        "python -m decoder_gateway.client TEXT --voice NAME.",
    )
    add_connection_options(parser)
    shared = argparse.ArgumentParser(add_help=False)
    add_connection_options(shared, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = commands.add_parser(
        "add",
        parents=[shared],
        help="clone a voice from a reference clip",
        description="Clone a voice from a reference clip (POST /v1/audio/voices).",
    )
    add.add_argument("name", help="the new voice's id: 1 to 64 of A-Z a-z 0-9 _ -")
    add.add_argument(
        "clip",
        help="reference recording of one speaker: wav, flac, mp3, ogg, opus, m4a or webm, "
        "0.5 to 60 s, at most 10 MB",
    )
    add.add_argument("--language", help="the speaker's language, e.g. Swahili")
    add.add_argument("--gender", help="e.g. female or male")
    add.add_argument(
        "--description", dest="speaker_description", metavar="TEXT", help="about the speaker"
    )
    add.add_argument("--consent", metavar="TEXT", help="the speaker's consent, as recorded")
    add.add_argument("--ref-text", metavar="TEXT", help="what is said in the clip")
    add.add_argument(
        "--base-voice",
        metavar="VOICE",
        help="built-in voice whose speaker id the clone uses (default: the server's choice)",
    )

    commands.add_parser(
        "list",
        aliases=["ls"],
        parents=[shared],
        help="list every voice: id, cloned, language, gender",
        description="List every voice (GET /v1/audio/voices).",
    )

    remove = commands.add_parser(
        "rm",
        aliases=["delete"],
        parents=[shared],
        help="delete a cloned voice",
        description="Delete a cloned voice (DELETE /v1/audio/voices/NAME).",
    )
    remove.add_argument("name", help="the cloned voice's id")

    levels = ("very_low", "low", "moderate", "high", "very_high")
    design = commands.add_parser(
        "design",
        parents=[shared],
        help="design voices from style labels, write their previews, save one",
        description="Design candidate voices from style labels (POST /v1/audio/voices/design; "
        "the server needs VOICE_DESIGN=on and the base model), write each preview as "
        "DIR/candidate-N.wav, and with --save keep one under a name.",
    )
    design.add_argument("--gender", required=True, choices=("female", "male"))
    design.add_argument("--pitch", choices=levels, default="moderate")
    design.add_argument("--speed", choices=levels, default="moderate")
    design.add_argument("--text", help="the preview sentence (default: the server's)")
    design.add_argument(
        "--candidates", type=int, choices=range(1, 5), metavar="N", help="1 to 4 (default 3)"
    )
    design.add_argument("--seed", type=int, help="the same seed designs the same voices")
    design.add_argument("--out", default=".", metavar="DIR", help="folder of the previews")
    design.add_argument("--save", metavar="NAME", help="save a candidate as voice NAME")
    design.add_argument(
        "--pick", type=int, default=1, metavar="N", help="the candidate --save keeps (default 1)"
    )
    design.add_argument(
        "--description", dest="speaker_description", metavar="TEXT", help="stored with --save"
    )
    return parser


def preview_wav(data_url: str) -> bytes:
    """The WAV bytes of a candidate's ``data:audio/wav;base64,`` URL."""
    header, _, payload = data_url.partition(",")
    if not header.startswith("data:audio/wav") or not header.endswith(";base64"):
        raise ClientError("unexpected reply from the server (a preview that is not WAV)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ClientError("unexpected reply from the server (bad base64 preview)") from err


async def run_design(client: GatewayClient, args: argparse.Namespace) -> None:
    """``voices design``: the candidates' previews into ``args.out``; ``--save`` one."""
    candidates = await client.design_voices(
        args.gender,
        args.pitch,
        args.speed,
        text=args.text,
        candidates=args.candidates,
        seed=args.seed,
    )
    paths = await asyncio.to_thread(write_previews, Path(args.out), candidates)
    for number, (path, candidate) in enumerate(zip(paths, candidates, strict=True), start=1):
        print(f"candidate {number}: {path} ({candidate.get('duration_s', 0):.1f} s)")
    if args.save:
        if not 1 <= args.pick <= len(candidates):
            raise ClientError(f"--pick {args.pick}: there are {len(candidates)} candidates")
        tokens = candidates[args.pick - 1]["global_tokens"]
        voice = await client.save_voice(
            args.save,
            tokens,
            gender=args.gender,
            speaker_description=args.speaker_description
            or f"designed: {args.gender}, pitch {args.pitch}, speed {args.speed}",
        )
        name = voice["id"]
        print(f"saved candidate {args.pick} as voice {name}; speak with --voice {name}")


def write_previews(folder: Path, candidates: list[dict]) -> list[Path]:
    """Each candidate's preview as ``folder/candidate-N.wav``; the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, candidate in enumerate(candidates, start=1):
        path = folder / f"candidate-{number}.wav"
        path.write_bytes(preview_wav(candidate["audio"]))
        paths.append(path)
    return paths


def voices_table(voices: list[dict]) -> str:
    """Columns id, cloned (yes/no), language, gender; ``-`` for a missing value."""
    rows = [("ID", "CLONED", "LANGUAGE", "GENDER")]
    for voice in voices:
        rows.append(
            (
                str(voice["id"]),
                "yes" if voice.get("cloned") else "no",
                voice.get("language") or "-",
                voice.get("gender") or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


async def run_voices_command(client: GatewayClient, args: argparse.Namespace, clip: bytes) -> None:
    """The ``voices`` subcommand ``args.command`` (``clip``: the file of ``add``)."""
    async with client:
        if args.command == "add":
            fields = {
                key: getattr(args, key)
                for key in (
                    "language",
                    "gender",
                    "speaker_description",
                    "consent",
                    "ref_text",
                    "base_voice",
                )
            }
            voice = await client.add_voice(args.name, clip, Path(args.clip).name, **fields)
            base = f", base voice {voice['base_voice']}" if voice.get("base_voice") else ""
            print(f"added voice {voice['id']}{base}; speak with --voice {voice['id']}")
        elif args.command in ("list", "ls"):
            sys.stdout.write(voices_table(await client.list_voices()))
        elif args.command == "design":
            await run_design(client, args)
        else:
            await client.delete_voice(args.name)
            print(f"deleted voice {args.name}")


def voices_main(argv: list[str]) -> int:
    parser = build_voices_parser()
    args = parser.parse_args(argv)
    try:
        client = GatewayClient(args.url, api_key=args.api_key, timeout_s=args.timeout)
    except ClientError as err:
        parser.error(str(err))
    clip = b""
    if args.command == "add":
        try:
            clip = Path(args.clip).read_bytes()
        except OSError as err:
            parser.error(f"cannot read {args.clip}: {err.strerror or err}")
    try:
        asyncio.run(run_voices_command(client, args, clip))
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (KeyError, TypeError) as err:
        print(f"error: unexpected reply from the server (no {err})", file=sys.stderr)
        return 1
    except OSError as err:  # design: the previews' folder cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# -- speech ---------------------------------------------------------------------------


def first_positional(argv: list[str], parser: argparse.ArgumentParser) -> int | None:
    """Index of the first argument that is neither an option nor an option's value."""
    takes_value = {
        option
        for action in parser._actions  # argparse lists its options nowhere public
        if action.nargs != 0
        for option in action.option_strings
    }
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            return None
        if arg.startswith("-") and arg != "-":
            index += 2 if arg in takes_value else 1
            continue
        return index
    return None


class Speech:
    """One synthesis over the chosen transport; :meth:`pcm` yields its audio as it comes."""

    def __init__(self, client: GatewayClient, transport: str, text: str, **options: Any) -> None:
        self.client = client
        self.transport = transport
        self.text = text
        self.options = options
        self.sample_rate = SAMPLE_RATE  # the server's, once its audio has begun

    async def pcm(self) -> AsyncIterator[bytes]:
        async with self.client:
            if self.transport == "ws":
                async with self.client.speech_socket() as socket:
                    async for chunk in socket.speak(self.text, **self.options):
                        self.sample_rate = socket.sample_rate
                        yield chunk
            else:
                async with self.client.speech_stream(self.text, **self.options) as response:
                    self.sample_rate = response.sample_rate
                    async for chunk in response.chunks():
                        yield chunk


async def receive(speech: Speech, progress: Progress, live: BinaryIO | None) -> bytes:
    """The whole PCM of ``speech`` (written to ``live`` as it comes, when given)."""
    pcm = bytearray()
    async for chunk in speech.pcm():
        progress.audio(len(chunk), speech.sample_rate)
        if live is not None:
            live.write(chunk)
            live.flush()
        else:
            pcm += chunk
    return bytes(pcm)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = first_positional(argv, parser)
    if command is not None and argv[command] == "voices":
        return voices_main(argv[:command] + argv[command + 1 :])
    args = parser.parse_args(argv)
    text = read_text(args, parser)
    output = args.output or f"speech.{args.format}"
    to_stdout = output == "-"
    live = sys.stdout.buffer if to_stdout and args.format == "pcm" else None
    try:
        client = GatewayClient(args.url, api_key=args.api_key, timeout_s=args.timeout)
    except ClientError as err:
        parser.error(str(err))
    speech = Speech(
        client,
        args.transport,
        text,
        voice=args.voice,
        speaker_id=args.speaker_id,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
    progress = Progress(sys.stderr, args.quiet)
    try:
        pcm = asyncio.run(receive(speech, progress, live))
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
                write_wav(sys.stdout.buffer, pcm, speech.sample_rate)
                sys.stdout.buffer.flush()
            elif args.format == "wav":
                with open(output, "wb") as target:
                    write_wav(target, pcm, speech.sample_rate)
            else:
                Path(output).write_bytes(pcm)
        except OSError as err:
            print(f"error: cannot write {output}: {err.strerror or err}", file=sys.stderr)
            return 1
    progress.summary(TRANSPORT_NAMES[args.transport], "stdout" if to_stdout else output)
    return 0
