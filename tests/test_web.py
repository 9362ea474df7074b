"""GET /web in a real browser: headless Chromium (Debian's package, /usr/bin/chromium)
driven by Playwright, against a real gateway and the deterministic stand-in LLM.

``scripts/test.sh`` installs Chromium when it is missing, so a missing browser fails
these tests rather than skipping them. ``CHROMIUM`` names another binary.
"""

from __future__ import annotations

import os
import re
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/test.sh does it)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, gateway, llm) -> Iterator[Page]:
    """The page, loaded with its voices; fails the test on any script error."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    page.goto(f"{gateway.url}/web")
    expect(page.get_by_role("button", name="Speak")).to_be_enabled(timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert not problems, problems


def status(page: Page):
    return page.locator("#status")


def speak(page: Page, text: str, voice: str | None = None, temperature: float = 0.7) -> None:
    page.get_by_label("Text").fill(text)
    if voice is not None:
        page.get_by_label("Voice").select_option(voice)
    # A range input cannot be typed into; set it the way dragging does.
    page.get_by_label("Temperature").evaluate(
        "(el, value) => { el.value = value; el.dispatchEvent(new Event('input')); }",
        str(temperature),
    )
    page.get_by_role("button", name="Speak").click()


def http_samples(gateway, text: str, voice: str) -> int:
    """What ``POST /v1/audio/speech/stream`` returns for the same text (deterministic)."""
    response = requests.post(
        f"{gateway.url}/v1/audio/speech/stream", json={"text": text, "voice": voice}, timeout=60
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
    voice = page.get_by_label("Voice")
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
    stop = page.get_by_role("button", name="Stop")
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
    page.get_by_label("API key").fill("page-key")
    page.get_by_label("API key").dispatch_event("change")
    expect(page.get_by_role("button", name="Speak")).to_be_enabled(timeout=TIMEOUT_MS)
    speak(page, "Oli otya?")
    expect(status(page)).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    assert int(status(page).get_attribute("data-received-samples")) > 0
    context.close()
