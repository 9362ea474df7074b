"""Voice cloning and the voice library, end to end: real gateway processes (uvicorn on
loopback) with the golden speaker-encoder checkpoint, the stand-in LLM, and real HTTP
and WebSocket clients.

The stand-in records every prompt, so a test sees exactly which speaker id and which
32 global tokens reached the LLM.
"""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from websockets.sync.client import connect as ws_connect

from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.gateway_server import GatewayServer
from devtools.paths import GOLDEN_SPEAKER

CLIPS = GOLDEN_SPEAKER / "clips"
VOICES = VoiceCatalog.load()


def golden_tokens(case: int) -> list[int]:
    """The reference implementation's 32 ids for clip ``case`` (cases.npz)."""
    return np.load(GOLDEN_SPEAKER / "cases.npz")[f"global_{case}"][0].tolist()


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def data_url(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


def upload(gateway, name: str, clip: bytes | Path, **fields: str) -> requests.Response:
    data = clip.read_bytes() if isinstance(clip, Path) else clip
    return requests.post(
        f"{gateway.url}/v1/audio/voices",
        files={"audio_sample": ("clip.wav", data, "audio/wav")},
        data={"name": name, **fields},
        timeout=60,
    )


def prompt_tokens(prompt: str) -> list[int]:
    return [int(t) for t in re.findall(r"<\|bicodec_global_(\d+)\|>", prompt)]


def last_prompt(llm) -> str:
    return llm.stats()["requests"][-1]["prompt"]


@pytest.fixture
def cloning_gateway(make_gateway, tmp_path) -> GatewayServer:
    return make_gateway(BICODEC_DIR=str(GOLDEN_SPEAKER), VOICE_LIBRARY_DIR=str(tmp_path / "lib"))


# -- the round trip --------------------------------------------------------------------


def test_upload_list_speak_restart_delete(make_gateway, llm, tmp_path):
    library = tmp_path / "library"
    env = {"BICODEC_DIR": str(GOLDEN_SPEAKER), "VOICE_LIBRARY_DIR": str(library)}
    gateway = make_gateway(**env)
    response = upload(
        gateway,
        "amina",
        CLIPS / "case_0.wav",
        language="Luganda",
        gender="female",
        consent="recorded with consent, 2026-11-29",
        speaker_description="warm, slow",
        base_voice="luganda_female",
    )
    assert response.status_code == 201, response.text
    voice = response.json()["voice"]
    # Exactly the reference implementation's ids for this clip.
    assert voice["global_tokens"] == golden_tokens(0)
    assert voice["id"] == voice["name"] == "amina"
    assert voice["speaker_id"] == 248 and voice["base_voice"] == "luganda_female"
    assert voice["consent"] == "recorded with consent, 2026-11-29"
    assert voice["speaker_description"] == "warm, slow" and voice["created_at"].endswith("Z")

    listed = requests.get(f"{gateway.url}/v1/audio/voices", timeout=10).json()["voices"]
    assert {"id": "amina", "name": "amina", "speaker_id": 248, "language": "Luganda",
            "gender": "female", "cloned": True} in listed  # fmt: skip
    assert [v["id"] for v in listed][:6] == VOICES.ids  # packaged first, unchanged
    native = requests.get(f"{gateway.url}/v1/voices", timeout=10).json()["voices"]
    assert any(v["id"] == "amina" and v["cloned"] for v in native)
    one = requests.get(f"{gateway.url}/v1/audio/voices/amina", timeout=10).json()["voice"]
    assert one["global_tokens"] == golden_tokens(0)

    def spoke_with_the_clone() -> None:
        prompt = last_prompt(llm)
        assert prompt_tokens(prompt) == golden_tokens(0)
        assert "<|start_content|>248: " in prompt

    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "amina"},
        timeout=30,
    )
    assert response.status_code == 200 and len(response.content) > 0
    spoke_with_the_clone()
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws") as ws:
        ws.send(json.dumps({"input": "Webale nnyo.", "voice": "amina", "segment_id": 1}))
        start = json.loads(ws.recv(timeout=30))
        assert start["type"] == "start" and start["voice"] == "amina"
        while isinstance(message := ws.recv(timeout=30), bytes):
            pass
        assert json.loads(message)["type"] == "end"
    spoke_with_the_clone()
    response = requests.post(
        f"{gateway.url}/v1/audio/speech",
        json={"input": "Oli otya?", "voice": "amina", "response_format": "wav"},
        timeout=30,
    )
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    spoke_with_the_clone()

    # A restart keeps the voice.
    gateway.stop()
    gateway = make_gateway(**env)
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "amina"},
        timeout=30,
    )
    assert response.status_code == 200
    spoke_with_the_clone()

    deleted = requests.delete(f"{gateway.url}/v1/audio/voices/amina", timeout=10)
    assert deleted.json() == {"id": "amina", "object": "voice", "deleted": True}
    assert requests.get(f"{gateway.url}/v1/audio/voices/amina", timeout=10).status_code == 404
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "amina"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "voice_not_found"
    assert list(library.glob("*.json")) == []


def test_replicas_sharing_the_folder_see_each_others_voices(make_gateway, llm, tmp_path):
    env = {"BICODEC_DIR": str(GOLDEN_SPEAKER), "VOICE_LIBRARY_DIR": str(tmp_path / "shared")}
    first, second = make_gateway(**env), make_gateway(**env)
    assert upload(first, "shared_voice", CLIPS / "case_1.wav").status_code == 201
    response = requests.post(
        f"{second.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "voice": "shared_voice"},
        timeout=30,
    )
    assert response.status_code == 200
    assert prompt_tokens(last_prompt(llm)) == golden_tokens(1)
    assert requests.delete(f"{second.url}/v1/audio/voices/shared_voice", timeout=10).ok
    assert requests.get(f"{first.url}/v1/audio/voices/shared_voice", timeout=10).status_code == 404


def test_concurrent_uploads_all_land_and_a_name_is_taken_once(cloning_gateway, llm):
    clip = (CLIPS / "case_2.wav").read_bytes()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: upload(cloning_gateway, f"v{i}", clip).status_code,
                                 range(8)))  # fmt: skip
        same = list(pool.map(lambda _: upload(cloning_gateway, "twin", clip).status_code,
                             range(4)))  # fmt: skip
    assert statuses == [201] * 8
    assert sorted(same) == [201, 409, 409, 409]
    listed = requests.get(f"{cloning_gateway.url}/v1/audio/voices", timeout=10).json()
    assert {f"v{i}" for i in range(8)} | {"twin"} <= {v["id"] for v in listed["voices"]}


# -- inline clips ---------------------------------------------------------------------


def test_inline_ref_audio_clones_for_one_request_and_stores_nothing(cloning_gateway, llm):
    url = data_url(CLIPS / "case_2.wav")
    response = requests.post(
        f"{cloning_gateway.url}/v1/audio/speech",
        json={
            "input": "Oli otya?",
            "ref_audio": url,
            "voice": "swahili_male",
            "response_format": "pcm",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    prompt = last_prompt(llm)
    assert prompt_tokens(prompt) == golden_tokens(2) and "246: " in prompt
    response = requests.post(
        f"{cloning_gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "ref_audio": url},
        timeout=30,
    )
    assert response.status_code == 200
    assert prompt_tokens(last_prompt(llm)) == golden_tokens(2)
    with ws_connect(f"{cloning_gateway.ws_url}/v1/audio/speech/stream/ws", max_size=None) as ws:
        small = data_url(CLIPS / "case_2.wav")
        ws.send(json.dumps({"input": "Oli otya?", "ref_audio": small, "segment_id": 4}))
        frame = json.loads(ws.recv(timeout=30))
        # The clip (64 kB of WAV) is over the default WS_MAX_MESSAGE_BYTES once in base64.
        assert frame["type"] == "error" and frame["code"] == "message_too_large"
    listed = requests.get(f"{cloning_gateway.url}/v1/audio/voices", timeout=10).json()
    assert not any(v["cloned"] for v in listed["voices"])
    bad = requests.post(
        f"{cloning_gateway.url}/v1/audio/speech",
        json={"input": "Oli otya?", "ref_audio": "data:audio/wav;base64,AAAA"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ref_audio"


def test_inline_ref_audio_on_the_websocket(make_gateway, llm, tmp_path):
    gateway = make_gateway(
        BICODEC_DIR=str(GOLDEN_SPEAKER),
        VOICE_LIBRARY_DIR=str(tmp_path / "lib"),
        WS_MAX_MESSAGE_BYTES=str(1 << 20),
    )
    with ws_connect(f"{gateway.ws_url}/v1/audio/speech/stream/ws", max_size=None) as ws:
        message = {"input": "Oli otya?", "ref_audio": data_url(CLIPS / "case_2.wav")}
        ws.send(json.dumps({**message, "segment_id": 1}))
        assert json.loads(ws.recv(timeout=30))["type"] == "start"
    assert prompt_tokens(last_prompt(llm)) == golden_tokens(2)


# -- bad input ------------------------------------------------------------------------


def silence(seconds: float) -> bytes:
    return wav_bytes(np.zeros(int(16000 * seconds)))


def noise(seconds: float) -> bytes:
    return wav_bytes(np.random.default_rng(0).uniform(-0.3, 0.3, int(16000 * seconds)))


BAD_UPLOADS = [
    ("not_audio", b"this is not audio at all" * 40, 400, "invalid_audio", "audio_sample"),
    ("empty", b"", 400, "invalid_audio", "audio_sample"),
    ("silent", silence(2.0), 400, "silent_audio", "audio_sample"),
    ("short", noise(0.2), 400, "audio_too_short", "audio_sample"),
    ("long", noise(61.0), 400, "audio_too_long", "audio_sample"),
    ("../etc", noise(1.0), 400, "invalid_request", "name"),
    ("a b", noise(1.0), 400, "invalid_request", "name"),
    ("x" * 65, noise(1.0), 400, "invalid_request", "name"),
    ("luganda_female", noise(1.0), 409, "voice_exists", "name"),
]


def test_bad_uploads_are_clear_4xx_and_store_nothing(cloning_gateway, llm):
    for name, clip, status, code, param in BAD_UPLOADS:
        response = upload(cloning_gateway, name, clip)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param), (name, error)
    too_big = upload(cloning_gateway, "big", b"\0" * (11 * 1024 * 1024))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "request_too_large"
    missing = requests.post(
        f"{cloning_gateway.url}/v1/audio/voices", data={"name": "nofile"}, timeout=10
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "audio_sample"
    bad_base = upload(cloning_gateway, "ok_name", noise(1.0), base_voice="nope")
    assert bad_base.status_code == 400 and bad_base.json()["error"]["param"] == "base_voice"
    assert upload(cloning_gateway, "taken", noise(1.0)).status_code == 201
    taken = upload(cloning_gateway, "taken", noise(1.0))
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "voice_exists"

    url = cloning_gateway.url
    assert requests.delete(f"{url}/v1/audio/voices/luganda_female", timeout=10).status_code == 400
    assert requests.delete(f"{url}/v1/audio/voices/nobody", timeout=10).status_code == 404
    assert requests.get(f"{url}/v1/audio/voices/nobody", timeout=10).status_code == 404
    listed = requests.get(f"{url}/v1/audio/voices", timeout=10).json()["voices"]
    assert [v["id"] for v in listed if v["cloned"]] == ["taken"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_without_a_speaker_encoder_cloning_is_501_and_packaged_voices_speak(gateway, llm):
    response = upload(gateway, "someone", CLIPS / "case_0.wav")
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["code"] == "cloning_unavailable" and "speaker encoder" in error["message"]
    inline = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": "Oli otya?", "ref_audio": data_url(CLIPS / "case_2.wav")},
        timeout=30,
    )
    assert inline.status_code == 501
    assert requests.get(f"{gateway.url}/", timeout=10).json()["cloning"] is False
    ok = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": "Oli otya?"}, timeout=30
    )
    assert ok.status_code == 200


def test_the_library_needs_the_api_key(make_gateway, llm, tmp_path):
    gateway = make_gateway(
        BICODEC_DIR=str(GOLDEN_SPEAKER),
        VOICE_LIBRARY_DIR=str(tmp_path / "lib"),
        GATEWAY_API_KEY="secret",
    )
    url = f"{gateway.url}/v1/audio/voices"
    key = {"Authorization": "Bearer secret"}
    clip = {"audio_sample": ("c.wav", (CLIPS / "case_2.wav").read_bytes(), "audio/wav")}
    assert requests.post(url, files=clip, data={"name": "k"}, timeout=30).status_code == 401
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(f"{url}/k", timeout=10).status_code == 401
    assert requests.delete(f"{url}/k", timeout=10).status_code == 401
    created = requests.post(url, files=clip, data={"name": "k"}, headers=key, timeout=30)
    assert created.status_code == 201
    assert requests.get(f"{url}/k", headers=key, timeout=10).status_code == 200
    assert requests.delete(f"{url}/k", headers=key, timeout=10).status_code == 200
