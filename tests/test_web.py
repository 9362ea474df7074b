"""GET /web in a real browser: headless Chromium (Debian's package, /usr/bin/chromium)
driven by Playwright, against a real gateway and the deterministic stand-in LLM.

``scripts/test.sh`` installs Chromium when it is missing, so a missing browser fails
these tests rather than skipping them. ``CHROMIUM`` names another binary.
"""

from __future__ import annotations

import os
import re
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from devtools.paths import GOLDEN_SPEAKER
from devtools.standin_llm import expected_global_tokens

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
TEXT = "Oli otya? Nze bulungi nnyo. Webale kunjogerako."
TIMEOUT_MS = 30_000
# A checkpoint with the speaker encoder (the default test gateway's has none), and
# reference clips for it.
SPEAKER_BICODEC = GOLDEN_SPEAKER
CLIPS = SPEAKER_BICODEC / "clips"
# What Chrome logs for a fetch answered with an error status: expected where a test
# asks for one, so not a script problem.
HTTP_ERROR_LOG = re.compile(r"^Failed to load resource: the server responded with a status of 4")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """One Playwright per module: the sync API allows only one at a time."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/test.sh does it)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        yield playwright


@contextmanager
def launched(playwright: Playwright, *extra_args: str) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=[*CHROMIUM_ARGS, *extra_args]
    )
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    with launched(playwright) as browser:
        yield browser


@contextmanager
def opened(
    browser: Browser, url: str, http_errors: bool = False, ready: bool = True
) -> Iterator[Page]:
    """The page at ``url``, with its voices loaded when ``ready``; fails the test on any
    script error (and on failed fetches, unless ``http_errors``)."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_console(message) -> None:
        if message.type == "error" and not (http_errors and HTTP_ERROR_LOG.match(message.text)):
            problems.append(f"console: {message.text}")

    page.on("console", on_console)
    page.goto(f"{url}/web")
    if ready:
        expect(page.get_by_role("button", name="Speak")).to_be_enabled(timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def page(browser: Browser, gateway, llm) -> Iterator[Page]:
    """The page, loaded with its voices; fails the test on any script error."""
    with opened(browser, gateway.url) as page:
        yield page


def status(page: Page):
    return page.locator("#status")


def speak(page: Page, text: str, voice: str | None = None, temperature: float = 0.7) -> None:
    page.get_by_label("Text", exact=True).fill(text)
    if voice is not None:
        page.get_by_label("Voice", exact=True).select_option(voice)
    # A range input cannot be typed into; set it the way dragging does.
    page.get_by_label("Temperature").evaluate(
        "(el, value) => { el.value = value; el.dispatchEvent(new Event('input')); }",
        str(temperature),
    )
    page.get_by_role("button", name="Speak").click()


def http_samples(gateway, text: str, voice: str, api_key: str | None = None) -> int:
    """What ``POST /v1/audio/speech/stream`` returns for the same text (deterministic)."""
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream",
        json={"text": text, "voice": voice},
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return len(response.content) // 2


# -- served files ------------------------------------------------------------------


def test_page_and_assets_are_served_self_contained(gateway):
    page = requests.get(f"{gateway.url}/web", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert requests.head(f"{gateway.url}/web", timeout=10).status_code == 200
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        asset = requests.get(f"{gateway.url}/web/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        # Works offline: nothing is loaded from another host.
        assert not re.search(r"https?://", asset.text), name
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
    missing = requests.get(f"{gateway.url}/web/index.html", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    assert requests.get(f"{gateway.url}/web/../app.py", timeout=10).status_code == 404


# -- in the browser ----------------------------------------------------------------


def test_voice_picker_lists_the_voices_with_the_default_selected(page):
    voice = page.get_by_label("Voice", exact=True)
    values = voice.locator("option").evaluate_all("options => options.map(o => o.value)")
    assert sorted(values) == sorted(
        [
            "acholi_female",
            "ateso_female",
            "runyankore_female",
            "lugbara_female",
            "swahili_male",
            "luganda_female",
        ]
    )
    expect(voice).to_have_value("luganda_female")
    expect(status(page)).to_have_attribute("data-state", "idle")


def test_speak_streams_plays_and_reports_ttfa_and_rtf(page, gateway):
    speak(page, TEXT, voice="swahili_male", temperature=0.9)
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)

    expected = http_samples(gateway, TEXT, "swahili_male")
    assert expected > 0
    assert int(status(page).get_attribute("data-end-samples")) == expected
    assert int(status(page).get_attribute("data-received-samples")) == expected
    expect(page.locator("#received")).to_contain_text(f"{expected} samples")
    expect(page.get_by_role("alert")).to_be_hidden()

    ttfa_ms = float(status(page).get_attribute("data-ttfa-ms"))
    rtf = float(status(page).get_attribute("data-rtf"))
    assert 0 < ttfa_ms < TIMEOUT_MS and rtf > 0
    expect(page.locator("#ttfa")).to_have_text(re.compile(r"^\d+ ms$|^\d+\.\d\d s$"))
    expect(page.locator("#rtf")).to_have_text(re.compile(r"^\d+\.\d{3} \(\d+\.\d× real time\)$"))
    expect(page.locator("#temperature-value")).to_have_text("0.90")

    # The frames were scheduled on a running AudioContext, back to back.
    state, scheduled_s = page.evaluate("[audioContext.state, current.player.endTime]")
    assert state == "running"
    assert scheduled_s >= expected / 16000


def test_download_is_a_wav_of_the_received_audio(page, gateway, tmp_path):
    download = page.get_by_role("button", name="Download WAV")
    expect(download).to_be_disabled()
    speak(page, TEXT, voice="acholi_female")
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expect(download).to_be_enabled()

    with page.expect_download() as info:
        download.click()
    path = tmp_path / "speech.wav"
    info.value.save_as(path)
    assert info.value.suggested_filename == "speech.wav"
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        assert wav.getnframes() == int(status(page).get_attribute("data-received-samples"))
        assert wav.getnframes() == http_samples(gateway, TEXT, "acholi_female")


def test_empty_text_shows_the_servers_error(page):
    speak(page, "   ")
    expect(status(page)).to_have_attribute("data-state", "error", timeout=TIMEOUT_MS)
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("The server reported an error")
    expect(alert).to_contain_text("input is empty")
    expect(alert).to_contain_text("invalid_request")
    expect(page.get_by_role("button", name="Download WAV")).to_be_disabled()

    # The next request clears the error.
    speak(page, "Oli otya?")
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expect(alert).to_be_hidden()


def test_mid_stream_failure_shows_the_error_frame(page, llm):
    llm.control(error_after_tokens=30, tokens_per_s=400)
    speak(page, "Oli otya leero mukwano gwange wange?")
    expect(status(page)).to_have_attribute("data-state", "error", timeout=TIMEOUT_MS)
    expect(page.get_by_role("alert")).to_contain_text("vLLM failed mid-stream")
    assert int(status(page).get_attribute("data-received-samples")) > 0
    assert status(page).get_attribute("data-end-samples") is None


def test_stop_ends_the_stream(page, llm):
    llm.control(tokens_per_s=50)  # slow: several seconds of generation
    speak(page, TEXT)
    expect(status(page)).to_have_attribute("data-ttfa-ms", re.compile(r"\d"), timeout=TIMEOUT_MS)
    stop = page.get_by_role("button", name="Stop", exact=True)
    stop.click()
    expect(status(page)).to_have_attribute("data-state", "stopped")
    expect(stop).to_be_disabled()
    expect(page.get_by_role("alert")).to_be_hidden()


def test_page_with_an_api_key(browser: Browser, make_gateway, llm):
    """With GATEWAY_API_KEY the page itself loads; the voices and the WebSocket need
    the key typed into the page (a Bearer header, then the WebSocket auth message)."""
    gateway = make_gateway(GATEWAY_API_KEY="page-key")
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{gateway.url}/web")
    expect(page.get_by_role("alert")).to_contain_text("API key", timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Speak")).to_be_disabled()
    page.get_by_label("API key", exact=True).fill("page-key")
    page.get_by_label("API key", exact=True).dispatch_event("change")
    expect(page.get_by_role("button", name="Speak")).to_be_enabled(timeout=TIMEOUT_MS)
    speak(page, "Oli otya?")
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    assert int(status(page).get_attribute("data-received-samples")) > 0
    context.close()


# -- the voices panel: clone, speak, delete ------------------------------------------


@pytest.fixture
def cloning_gateway(make_gateway, llm, tmp_path) -> Callable[..., object]:
    """Starts a gateway that can clone (the golden speaker encoder), with an empty voice
    library; extra settings as keyword arguments."""

    def start(**env: str):
        return make_gateway(
            BICODEC_DIR=str(SPEAKER_BICODEC), VOICE_LIBRARY_DIR=str(tmp_path / "voices"), **env
        )

    return start


def pcm16_wav(source: Path, target: Path, rate: int = 48000) -> Path:
    """``source`` decoded and resampled with PyAV, written as 16-bit PCM mono WAV (what
    Chromium's fake audio capture plays)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    chunks = []
    with av.open(str(source)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    with wave.open(str(target), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.concatenate(chunks).astype("<i2").tobytes())
    return target


@pytest.fixture(scope="module")
def mic_browser(
    playwright: Playwright, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    """Chromium whose microphone plays a speech clip (permission granted, no prompt)."""
    clip = pcm16_wav(CLIPS / "case_1.wav", tmp_path_factory.mktemp("mic") / "speech.wav")
    with launched(
        playwright,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={clip}",
    ) as browser:
        yield browser


def picker(page: Page):
    return page.get_by_label("Voice", exact=True)


def clone_status(page: Page):
    return page.locator("#clone-status")


def cloned_ids(gateway, api_key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{gateway.url}/v1/audio/voices", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return [voice["id"] for voice in response.json()["voices"] if voice["cloned"]]


def add_from_file(page: Page, name: str, clip: Path = CLIPS / "case_0.wav") -> None:
    page.get_by_label("Audio file").set_input_files(str(clip))
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Add voice").click()


def expect_selected_clone(page: Page, name: str) -> None:
    expect(picker(page)).to_have_value(name)
    option = picker(page).locator(f'optgroup[label="Cloned voices"] > option[value="{name}"]')
    expect(option).to_have_text(re.compile(rf"^{name} \(cloned\)"))
    expect(page.locator("#selected-voice")).to_have_text(name)
    expect(page.get_by_role("button", name="Delete voice")).to_be_enabled()


def speak_and_check(page: Page, gateway, voice: str, api_key: str | None = None) -> None:
    """Speaks TEXT with the selected voice: every sample arrives and is scheduled."""
    speak(page, TEXT)
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expected = http_samples(gateway, TEXT, voice, api_key)
    assert expected > 0
    assert int(status(page).get_attribute("data-end-samples")) == expected
    assert int(status(page).get_attribute("data-received-samples")) == expected
    state, scheduled_s = page.evaluate("[audioContext.state, current.player.endTime]")
    assert state == "running" and scheduled_s >= expected / 16000


def test_clone_from_a_file_speak_with_it_and_delete_it(browser: Browser, cloning_gateway):
    gateway = cloning_gateway()
    with opened(browser, gateway.url, http_errors=True) as page:
        expect(page.locator("#cloning-note")).to_be_hidden()
        alert = page.locator("#clone-error")

        # Checked in the page: a clip is needed, and a name of the server's pattern.
        page.get_by_role("button", name="Add voice").click()
        expect(alert).to_contain_text("No clip")
        page.get_by_label("Audio file").set_input_files(str(CLIPS / "case_0.wav"))
        expect(page.locator("#clip-summary")).to_contain_text("case_0.wav")
        expect(page.locator("#clip-preview")).to_have_attribute("src", re.compile("^blob:"))
        name = page.get_by_label("Name", exact=True)
        name.fill("my voice")
        page.get_by_role("button", name="Add voice").click()
        expect(alert).to_contain_text("“my voice” is not a valid name")
        expect(name).to_have_attribute("aria-invalid", "true")
        expect(name).to_be_focused()
        expect(clone_status(page)).to_have_attribute("data-state", "invalid")
        assert cloned_ids(gateway) == []

        name.fill("file_voice")
        page.get_by_label("Language").fill("Luganda")
        page.get_by_label("Gender").select_option("female")
        page.get_by_text("More about the voice").click()
        page.get_by_label("Base voice").select_option("swahili_male")
        page.get_by_label("The speaker agreed").check()
        page.get_by_role("button", name="Add voice").click()
        expect(clone_status(page)).to_have_attribute("data-state", "added", timeout=TIMEOUT_MS)
        expect(clone_status(page)).to_have_text(re.compile("Added the voice “file_voice”"))
        expect(alert).to_be_hidden()
        expect_selected_clone(page, "file_voice")
        expect(picker(page).locator('option[value="file_voice"]')).to_have_text(
            "file_voice (cloned): Luganda, female"
        )
        stored = requests.get(f"{gateway.url}/v1/audio/voices/file_voice", timeout=10).json()
        assert stored["voice"]["base_voice"] == "swahili_male"
        assert stored["voice"]["gender"] == "female" and stored["voice"]["consent"]
        # The form is cleared for the next voice.
        expect(name).to_have_value("")
        expect(page.locator("#preview")).to_be_hidden()

        # The server's own error: the name is taken.
        add_from_file(page, "file_voice")
        expect(alert).to_contain_text("The server did not add the voice", timeout=TIMEOUT_MS)
        expect(alert).to_contain_text("already exists")
        expect(alert).to_contain_text("voice_exists")
        expect(clone_status(page)).to_have_attribute("data-state", "error")

        # Speak with it like with any voice.
        speak_and_check(page, gateway, "file_voice")

        # Built-in voices cannot be deleted.
        picker(page).select_option("acholi_female")
        expect(page.get_by_role("button", name="Delete voice")).to_be_disabled()
        expect(page.locator("#selected-kind")).to_contain_text("built-in")

        # Deleting asks first; Cancel keeps the voice.
        picker(page).select_option("file_voice")
        page.get_by_role("button", name="Delete voice").click()
        confirm = page.get_by_role("group", name=re.compile("Delete the cloned voice"))
        expect(confirm).to_contain_text("Delete the cloned voice “file_voice”?")
        expect(page.get_by_role("button", name="Cancel")).to_be_focused()
        page.get_by_role("button", name="Cancel").click()
        expect(confirm).to_be_hidden()
        assert cloned_ids(gateway) == ["file_voice"]

        page.get_by_role("button", name="Delete voice").click()
        page.get_by_role("button", name="Yes, delete").click()
        expect(clone_status(page)).to_have_attribute("data-state", "deleted", timeout=TIMEOUT_MS)
        expect(picker(page).locator('option[value="file_voice"]')).to_have_count(0)
        expect(picker(page)).to_have_value("luganda_female")
        expect(confirm).to_be_hidden()
        assert cloned_ids(gateway) == []


def test_clone_from_the_microphone(mic_browser: Browser, cloning_gateway):
    gateway = cloning_gateway()
    with opened(mic_browser, gateway.url) as page:
        record = page.get_by_role("button", name="Record", exact=True)
        stop = page.get_by_role("button", name="Stop recording")
        expect(stop).to_be_disabled()
        record.click()
        expect(clone_status(page)).to_have_attribute("data-state", "recording")
        expect(record).to_be_disabled()
        # The recording time counts up; stop after about 2 s.
        page.wait_for_function(
            "parseFloat(document.getElementById('record-time').textContent) >= 2",
            timeout=TIMEOUT_MS,
        )
        stop.click()
        expect(clone_status(page)).to_have_attribute("data-state", "recorded")
        expect(page.locator("#record-time")).to_have_text(re.compile(r"^[2-9]\.\d s$"))
        expect(page.locator("#clip-summary")).to_contain_text("Recording, ")
        preview = page.locator("#clip-preview")
        expect(preview).to_have_attribute("src", re.compile("^blob:"))
        size = page.evaluate("clip.blob.size")
        assert size > 1000

        page.get_by_label("Name", exact=True).fill("mic_voice")
        page.get_by_role("button", name="Add voice").click()
        expect(clone_status(page)).to_have_attribute("data-state", "added", timeout=TIMEOUT_MS)
        expect_selected_clone(page, "mic_voice")
        assert cloned_ids(gateway) == ["mic_voice"]
        tokens = requests.get(f"{gateway.url}/v1/audio/voices/mic_voice", timeout=10).json()
        assert len(tokens["voice"]["global_tokens"]) == 32
        speak_and_check(page, gateway, "mic_voice")


def test_without_a_speaker_encoder_the_page_says_cloning_is_unavailable(page):
    """The default test gateway's checkpoint (golden_small) cannot clone."""
    note = page.locator("#cloning-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Voice cloning is not available on this server")
    expect(page.get_by_role("button", name="Add voice")).to_be_hidden()
    expect(page.get_by_role("button", name="Record", exact=True)).to_be_hidden()
    expect(page.get_by_label("Audio file")).to_be_hidden()
    expect(page.get_by_role("button", name="Delete voice")).to_be_disabled()
    expect(page.locator("#selected-voice")).to_have_text("luganda_female")


def test_clone_with_an_api_key(browser: Browser, cloning_gateway):
    gateway = cloning_gateway(GATEWAY_API_KEY="clone-key")
    with opened(browser, gateway.url, http_errors=True, ready=False) as page:
        expect(page.get_by_role("alert")).to_contain_text("API key", timeout=TIMEOUT_MS)
        expect(page.locator("#cloning-note")).to_contain_text("API key")
        expect(page.get_by_role("button", name="Add voice")).to_be_hidden()
        key = page.get_by_label("API key", exact=True)
        key.fill("clone-key")
        key.dispatch_event("change")
        expect(page.get_by_role("button", name="Speak")).to_be_enabled(timeout=TIMEOUT_MS)
        expect(page.locator("#cloning-note")).to_be_hidden()

        add_from_file(page, "keyed_voice", CLIPS / "case_3.wav")
        expect(clone_status(page)).to_have_attribute("data-state", "added", timeout=TIMEOUT_MS)
        expect_selected_clone(page, "keyed_voice")
        assert cloned_ids(gateway, api_key="clone-key") == ["keyed_voice"]
        speak_and_check(page, gateway, "keyed_voice", api_key="clone-key")

        page.get_by_role("button", name="Delete voice").click()
        page.get_by_role("button", name="Yes, delete").click()
        expect(clone_status(page)).to_have_attribute("data-state", "deleted", timeout=TIMEOUT_MS)
        assert cloned_ids(gateway, api_key="clone-key") == []


# -- the Design panel ---------------------------------------------------------------


def test_design_audition_and_save_a_voice(browser: Browser, make_gateway, llm):
    gateway = make_gateway(VOICE_DESIGN="on")
    with opened(browser, gateway.url, http_errors=True) as page:
        page.get_by_label("Speaker", exact=True).select_option("male")
        page.get_by_label("Pitch", exact=True).select_option("low")
        page.get_by_label("Candidates", exact=True).select_option("2")
        page.get_by_role("button", name="Design", exact=True).click()
        design_status = page.locator("#design-status")
        expect(design_status).to_have_attribute("data-state", "designed", timeout=TIMEOUT_MS)
        players = page.locator("#design-candidates audio")
        expect(players).to_have_count(2)
        expect(players.first).to_have_attribute("src", re.compile("^data:audio/wav;base64,"))
        # The browser itself decodes the preview.
        duration = players.nth(1).evaluate(
            "a => new Promise(done => a.readyState >= 1 ? done(a.duration)"
            " : a.addEventListener('loadedmetadata', () => done(a.duration)))"
        )
        assert duration > 0.1
        page.get_by_label("Keep", exact=True).select_option("1")
        page.get_by_label("Name to save as", exact=True).fill("deep_voice")
        page.get_by_role("button", name="Save voice").click()
        expect(design_status).to_have_attribute("data-state", "saved", timeout=TIMEOUT_MS)
        expect(page.get_by_label("Voice", exact=True)).to_have_value("deep_voice")
    stored = requests.get(f"{gateway.url}/v1/audio/voices/deep_voice", timeout=10).json()
    designs = [r for r in llm.stats()["requests"] if "task_controllable_tts" in r["prompt"]]
    second = max(designs, key=lambda r: r["seed"])  # candidate 2 samples with seed + 1
    assert "<|gender_1|><|pitch_label_1|>" in second["prompt"]
    tokens = stored["voice"]["global_tokens"]
    assert tokens == expected_global_tokens(second["prompt"], seed=second["seed"])
    assert stored["voice"]["gender"] == "male"
