"""``python -m decoder_gateway.client`` as a user runs it: a subprocess against a real
gateway (and the deterministic stand-in LLM), over the WebSocket and over HTTP; and its
``voices`` subcommands against a gateway that can clone (the golden speaker encoder)."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import requests

from devtools.gateway_server import REPO, free_port
from devtools.paths import GOLDEN_SPEAKER

TEXT = "Oli otya? Nze bulungi nnyo."
TRANSPORTS = ["--ws", "--http"]
# A checkpoint with the speaker encoder, and reference clips for it.
SPEAKER_BICODEC = GOLDEN_SPEAKER
CLIP = SPEAKER_BICODEC / "clips" / "case_0.wav"
PACKAGED = {
    "acholi_female",
    "ateso_female",
    "runyankore_female",
    "lugbara_female",
    "swahili_male",
    "luganda_female",
}


def client_env(api_key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_API_KEY"}
    if api_key is not None:
        env["GATEWAY_API_KEY"] = api_key
    return env


def run_client(
    url: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "decoder_gateway.client", "--url", url, *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=False,
        env=env or client_env(),
    )


def stream_bytes(gateway, text: str, voice: str, api_key: str | None = None) -> int:
    """Bytes of PCM that ``POST /v1/audio/speech/stream`` returns for the same request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": text, "voice": voice},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return len(response.content)


def stderr_of(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_writes_a_16khz_mono_16bit_wav(gateway, llm, tmp_path, transport):
    out = tmp_path / "out.wav"
    result = run_client(
        gateway.url, TEXT, "--voice", "luganda_female", transport, "-t", "0.8", "-o", str(out)
    )
    assert result.returncode == 0, stderr_of(result)
    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        assert wav.getcomptype() == "NONE"
        frames = wav.getnframes()
        assert len(wav.readframes(frames)) == 2 * frames
    assert frames > 0
    assert 2 * frames == stream_bytes(gateway, TEXT, "luganda_female")
    log = stderr_of(result)
    assert f"{frames} samples at 16000 Hz" in log
    assert "time to first audio: 0." in log and "real-time factor: " in log
    assert result.stdout == b""


def test_stdin_to_raw_pcm_on_stdout(gateway, llm):
    args = ["-", "--voice", "swahili_male", "--format", "pcm", "-o", "-", "-q"]
    result = run_client(gateway.url, *args, stdin=TEXT.encode())
    assert result.returncode == 0, stderr_of(result)
    assert len(result.stdout) == stream_bytes(gateway, TEXT, "swahili_male")
    assert result.stderr == b""  # --quiet


def test_text_file_over_http_to_raw_pcm_file(gateway, llm, tmp_path):
    text_file = tmp_path / "story.txt"
    text_file.write_text("Webale kunjogerako.\nOli otya leero?\n", encoding="utf-8")
    out = tmp_path / "out.pcm"
    result = run_client(
        gateway.url, "-f", str(text_file), "--http", "--format", "pcm", "-o", str(out)
    )
    assert result.returncode == 0, stderr_of(result)
    assert out.stat().st_size == stream_bytes(gateway, text_file.read_text(), "luganda_female")


def test_wav_on_stdout(gateway, llm, tmp_path):
    result = run_client(gateway.url, TEXT, "-o", "-")
    assert result.returncode == 0, stderr_of(result)
    path = tmp_path / "stdout.wav"
    path.write_bytes(result.stdout)
    with wave.open(str(path), "rb") as wav:
        assert 2 * wav.getnframes() == stream_bytes(gateway, TEXT, "luganda_female")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_voice_exits_1_with_the_servers_message(gateway, llm, tmp_path, transport):
    out = tmp_path / "out.wav"
    result = run_client(gateway.url, "hi", "--voice", "klingon", transport, "-o", str(out))
    assert result.returncode == 1
    log = stderr_of(result)
    assert "error: server error: unknown voice 'klingon'; valid voices: acholi_female" in log
    assert not out.exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mid_stream_failure_exits_1_and_writes_nothing(gateway, llm, tmp_path, transport):
    llm.control(error_after_tokens=30, tokens_per_s=400)
    out = tmp_path / "out.wav"
    text = "Oli otya leero mukwano gwange wange?"
    result = run_client(gateway.url, text, transport, "-o", str(out))
    assert result.returncode == 1
    log = stderr_of(result)
    if transport == "--ws":
        assert "vLLM failed mid-stream" in log
    else:
        assert "the stream broke off after" in log
    assert not out.exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_server_exits_1(tmp_path, transport):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_client(url, "hi", transport, "-o", str(tmp_path / "out.wav"), "--timeout", "5")
    endpoint = (
        f"{url.replace('http', 'ws', 1)}/v1/audio/speech/stream/ws"
        if transport == "--ws"
        else f"{url}/v1/audio/speech/stream"
    )
    assert result.returncode == 1
    assert f"error: cannot connect to {endpoint}" in stderr_of(result)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["   "], None, "the text is empty"),
        (["-"], b"\n", "the text is empty"),
        ([], None, "give the text to speak"),
        (["hi", "-f", "x.txt"], None, "not both"),
        (["-f", "/nonexistent/x.txt"], None, "cannot read /nonexistent/x.txt"),
        (["hi", "--format", "mp3"], None, "invalid choice: 'mp3'"),
        (["hi", "--url", "ftp://example.org"], None, "unsupported URL scheme 'ftp'"),
    ],
)
def test_usage_errors_exit_2(args, stdin, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "decoder_gateway.client", *args, "-o", str(tmp_path / "o.wav")],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in stderr_of(result)


def test_client_does_not_import_the_serving_stack():
    """The client imports neither torch nor the serving code: quick to start anywhere."""
    code = (
        "import sys, decoder_gateway.client; "
        "print(sorted(m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60, check=True
    )
    assert result.stdout.strip() == b"[]"


# -- voices add / list / rm ------------------------------------------------------------


@pytest.fixture
def cloning_gateway(make_gateway, llm, tmp_path):
    """A gateway whose checkpoint has the speaker encoder, with an empty voice library."""
    return make_gateway(
        BICODEC_DIR=str(SPEAKER_BICODEC), VOICE_LIBRARY_DIR=str(tmp_path / "voices")
    )


def stdout_of(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def table(result: subprocess.CompletedProcess[bytes]) -> dict[str, list[str]]:
    """``voices list`` output: id -> [cloned, language, gender] (header checked)."""
    header, *rows = stdout_of(result).splitlines()
    assert header.split() == ["ID", "CLONED", "LANGUAGE", "GENDER"]
    return {row.split()[0]: row.split()[1:] for row in rows}


def wav_frames(path: Path) -> int:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        return wav.getnframes()


def test_voices_add_list_speak_rm(cloning_gateway, tmp_path):
    gateway = cloning_gateway
    result = run_client(
        gateway.url,
        "voices",
        "add",
        "amina",
        str(CLIP),
        "--language",
        "Swahili",
        "--gender",
        "female",
        "--description",
        "calm, low voice",
        "--consent",
        "recorded with consent on 2024-05-01",
        "--ref-text",
        "the words of the clip",
        "--base-voice",
        "swahili_male",
    )
    assert result.returncode == 0, stderr_of(result)
    assert "added voice amina, base voice swahili_male" in stdout_of(result)
    stored = requests.get(f"{gateway.url}/v1/audio/voices/amina", timeout=10).json()["voice"]
    assert stored["id"] == "amina" and len(stored["global_tokens"]) == 32
    assert {k: stored[k] for k in ("language", "gender", "base_voice")} == {
        "language": "Swahili",
        "gender": "female",
        "base_voice": "swahili_male",
    }
    assert stored["speaker_description"] == "calm, low voice"
    assert stored["consent"] == "recorded with consent on 2024-05-01"
    assert stored["ref_text"] == "the words of the clip"

    # Options may also follow the subcommand; a second voice with no metadata.
    result = run_client(
        "http://127.0.0.1:9", "voices", "add", "b-2", str(CLIP), "--url", gateway.url
    )
    assert result.returncode == 0, stderr_of(result)

    listing = run_client(gateway.url, "voices", "list")
    assert listing.returncode == 0, stderr_of(listing)
    rows = table(listing)
    assert set(rows) == PACKAGED | {"amina", "b-2"}
    assert rows["amina"] == ["yes", "Swahili", "female"]
    assert rows["b-2"] == ["yes", "-", "-"]
    assert rows["luganda_female"] == ["no", "Luganda", "female"]

    # Speak with it, over both transports, exactly as with a packaged voice.
    for transport in TRANSPORTS:
        out = tmp_path / f"amina{transport}.wav"
        result = run_client(gateway.url, TEXT, "--voice", "amina", transport, "-o", str(out))
        assert result.returncode == 0, stderr_of(result)
        assert 2 * wav_frames(out) == stream_bytes(gateway, TEXT, "amina")

    result = run_client(gateway.url, "voices", "rm", "amina")
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result).strip() == "deleted voice amina"
    assert set(table(run_client(gateway.url, "voices", "ls"))) == PACKAGED | {"b-2"}
    gone = requests.get(f"{gateway.url}/v1/audio/voices/amina", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"

    # Gone: deleting it again, or speaking with it, fails with the server's message.
    result = run_client(gateway.url, "voices", "rm", "amina")
    assert result.returncode == 1
    log = stderr_of(result)
    assert "error: server error: no cloned voice named 'amina' (HTTP 404)" in log, log
    result = run_client(gateway.url, "hi", "--voice", "amina", "-o", str(tmp_path / "x.wav"))
    assert result.returncode == 1 and "amina" in stderr_of(result)


def test_voices_errors_exit_1_with_the_servers_message(cloning_gateway, tmp_path):
    gateway = cloning_gateway
    result = run_client(gateway.url, "voices", "add", "bad name!", str(CLIP))
    assert result.returncode == 1
    log = stderr_of(result)
    assert "error: server error: invalid voice name 'bad name!'" in log, log
    assert "(HTTP 400)" in log and "Traceback" not in log
    assert result.stdout == b""

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio at all", encoding="utf-8")
    result = run_client(gateway.url, "voices", "add", "notes", str(not_audio))
    assert result.returncode == 1 and "(HTTP 400)" in stderr_of(result), stderr_of(result)

    assert run_client(gateway.url, "voices", "add", "twice", str(CLIP)).returncode == 0
    result = run_client(gateway.url, "voices", "add", "twice", str(CLIP))
    assert result.returncode == 1
    assert "already exists" in stderr_of(result) and "(HTTP 409)" in stderr_of(result)

    result = run_client(gateway.url, "voices", "rm", "luganda_female")
    assert result.returncode == 1
    assert "cannot be deleted (HTTP 400)" in stderr_of(result), stderr_of(result)


def test_voices_add_without_a_speaker_encoder_exits_1(gateway, llm):
    """The default test gateway (golden_small) has no speaker encoder: 501."""
    result = run_client(gateway.url, "voices", "add", "nope", str(CLIP))
    assert result.returncode == 1
    log = stderr_of(result)
    assert "voice cloning is not available on this server" in log and "(HTTP 501)" in log


def test_voices_with_an_api_key(make_gateway, llm, tmp_path):
    gateway = make_gateway(
        BICODEC_DIR=str(SPEAKER_BICODEC),
        VOICE_LIBRARY_DIR=str(tmp_path / "voices"),
        GATEWAY_API_KEY="cli-key",
    )
    result = run_client(gateway.url, "voices", "list")
    assert result.returncode == 1
    assert "missing or wrong API key" in stderr_of(result) and "(HTTP 401)" in stderr_of(result)

    result = run_client(gateway.url, "voices", "add", "keyed", str(CLIP), "--api-key", "cli-key")
    assert result.returncode == 0, stderr_of(result)
    # GATEWAY_API_KEY in the environment is the default key.
    result = run_client(gateway.url, "voices", "list", env=client_env("cli-key"))
    assert result.returncode == 0 and table(result)["keyed"][0] == "yes", stderr_of(result)

    expected = stream_bytes(gateway, TEXT, "keyed", api_key="cli-key")
    for transport in TRANSPORTS:
        out = tmp_path / f"keyed{transport}.wav"
        args = [TEXT, "--voice", "keyed", transport, "-o", str(out)]
        refused = run_client(gateway.url, *args)
        assert refused.returncode == 1 and not out.exists()
        result = run_client(gateway.url, *args, "--api-key", "cli-key")
        assert result.returncode == 0, stderr_of(result)
        assert 2 * wav_frames(out) == expected

    result = run_client(gateway.url, "voices", "rm", "keyed", env=client_env("cli-key"))
    assert result.returncode == 0, stderr_of(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["voices", "add", "x", "/nonexistent/clip.wav"], "cannot read /nonexistent/clip.wav"),
        (["voices", "add", "x"], "the following arguments are required: clip"),
        (["voices"], "the following arguments are required: COMMAND"),
        (["voices", "rename", "x"], "invalid choice: 'rename'"),
        (["voices", "list", "--url", "ftp://example.org"], "unsupported URL scheme 'ftp'"),
    ],
)
def test_voices_usage_errors_exit_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "decoder_gateway.client", *args],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
        env=client_env(),
    )
    assert result.returncode == 2, stderr_of(result)
    assert message in stderr_of(result)
    assert "usage: python -m decoder_gateway.client voices" in stderr_of(result)


def test_the_word_voices_is_spoken_after_a_double_dash(gateway, llm, tmp_path):
    out = tmp_path / "voices.wav"
    result = run_client(gateway.url, "-o", str(out), "--", "voices")
    assert result.returncode == 0, stderr_of(result)
    assert 2 * wav_frames(out) == stream_bytes(gateway, "voices", "luganda_female")
