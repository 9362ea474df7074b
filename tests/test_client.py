"""``python -m decoder_gateway.client`` as a user runs it: a subprocess against a real
gateway (and the deterministic stand-in LLM), over the WebSocket and over HTTP."""

from __future__ import annotations

import subprocess
import sys
import wave

import pytest
import requests

from decoder_gateway.testing.gateway_server import REPO, free_port

TEXT = "Oli otya? Nze bulungi nnyo."
TRANSPORTS = ["--ws", "--http"]


def run_client(
    url: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "decoder_gateway.client", "--url", url, *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def stream_bytes(gateway, text: str, voice: str) -> int:
    """Bytes of PCM that ``POST /v1/audio/speech/stream`` returns for the same request."""
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": text, "voice": voice}, timeout=60
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
