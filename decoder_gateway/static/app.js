// The try-it page: stream speech over the gateway's WebSocket and play it with Web Audio.
//
// Protocol (WS v1/audio/speech/stream/ws): send one JSON message {input, voice,
// temperature, segment_id, continue}; receive {"type": "start", ...}, binary PCM16 LE
// 16 kHz mono frames, then {"type": "end", samples, duration_s} or {"type": "error",
// message, code}.
//
// For tests and the curious, #status carries data-state (idle | connecting | streaming
// | done | error | stopped), data-received-samples, data-end-samples, data-ttfa-ms and
// data-rtf.
"use strict";

const SAMPLE_RATE = 16000; // what the gateway sends; AudioBuffers at this rate are resampled
const START_LEAD_S = 0.05; // schedule ahead of "now" so the first frame is not clipped

const ui = {
  form: document.getElementById("speak-form"),
  text: document.getElementById("text"),
  voice: document.getElementById("voice"),
  temperature: document.getElementById("temperature"),
  temperatureValue: document.getElementById("temperature-value"),
  speak: document.getElementById("speak"),
  stop: document.getElementById("stop"),
  download: document.getElementById("download"),
  status: document.getElementById("status"),
  error: document.getElementById("error"),
  ttfa: document.getElementById("ttfa"),
  rtf: document.getElementById("rtf"),
  received: document.getElementById("received"),
  apiKey: document.getElementById("api-key"),
};

// With GATEWAY_API_KEY set, fetches carry it as a Bearer token and the WebSocket
// sends it as its first message (browsers cannot set WebSocket headers).
function apiKey() {
  return ui.apiKey.value.trim();
}

function authHeaders() {
  return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
}

// Endpoints relative to the page (served at <base>/web), so a path prefix still works.
function apiUrl(path) {
  return new URL(path, document.baseURI);
}

function wsUrl(path) {
  const url = apiUrl(path);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// -- audio --------------------------------------------------------------------

let audioContext = null;

function getAudioContext() {
  // Created on the first click: browsers only let a user gesture start audio.
  audioContext ??= new AudioContext();
  return audioContext;
}

/** Little-endian PCM16 bytes (even length) -> floats in [-1, 1). */
function pcm16ToFloat32(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const samples = new Float32Array(bytes.byteLength / 2);
  for (let i = 0; i < samples.length; i++) {
    samples[i] = view.getInt16(2 * i, true) / 32768;
  }
  return samples;
}

/** Plays frames back to back: each one starts exactly where the previous one ends. */
class GaplessPlayer {
  constructor(context, onIdle) {
    this.context = context;
    this.onIdle = onIdle;
    this.endTime = 0;
    this.sources = new Set();
  }

  play(samples) {
    const buffer = this.context.createBuffer(1, samples.length, SAMPLE_RATE);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // If the stream fell behind playback, start again a little ahead of now.
    this.endTime = Math.max(this.endTime, this.context.currentTime + START_LEAD_S);
    source.start(this.endTime);
    this.endTime += buffer.duration;
    this.sources.add(source);
    source.addEventListener("ended", () => {
      this.sources.delete(source);
      if (this.sources.size === 0) this.onIdle();
    });
  }

  get playing() {
    return this.sources.size > 0;
  }

  stop() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
  }
}

/** A WAV file (PCM16 mono, 16 kHz) of the received chunks. */
function wavBlob(chunks, byteLength) {
  const header = new DataView(new ArrayBuffer(44));
  const ascii = (offset, text) => {
    for (let i = 0; i < text.length; i++) header.setUint8(offset + i, text.charCodeAt(i));
  };
  ascii(0, "RIFF");
  header.setUint32(4, 36 + byteLength, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  header.setUint32(16, 16, true); // fmt chunk size
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, SAMPLE_RATE, true);
  header.setUint32(28, SAMPLE_RATE * 2, true); // bytes per second
  header.setUint16(32, 2, true); // bytes per frame
  header.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  header.setUint32(40, byteLength, true);
  return new Blob([header.buffer, ...chunks], { type: "audio/wav" });
}

// -- page state -----------------------------------------------------------------

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function showError(title, message, code) {
  ui.error.replaceChildren();
  const heading = document.createElement("strong");
  heading.textContent = title;
  ui.error.append(heading, document.createTextNode(message));
  if (code) {
    const codeElement = document.createElement("code");
    codeElement.textContent = ` (${code})`;
    ui.error.append(codeElement);
  }
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function formatSeconds(seconds) {
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

let downloadUrl = null;

function setDownload(blob) {
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = blob ? URL.createObjectURL(blob) : null;
  ui.download.disabled = !blob;
}

function saveDownload() {
  if (!downloadUrl) return;
  const link = document.createElement("a");
  link.href = downloadUrl;
  link.download = "speech.wav";
  link.click();
}

function resetMetrics() {
  for (const element of [ui.ttfa, ui.rtf, ui.received]) element.textContent = "–";
  for (const key of ["receivedSamples", "endSamples", "ttfaMs", "rtf"]) {
    delete ui.status.dataset[key];
  }
}

// -- one synthesis ----------------------------------------------------------------

let current = null;

class Synthesis {
  constructor(request) {
    this.request = request;
    this.startedAt = performance.now(); // time to first audio counts from the click
    this.firstAudioAt = null;
    this.chunks = [];
    this.byteLength = 0;
    this.carry = null; // a byte left over if a frame ever split a sample
    this.finished = false;
    this.player = new GaplessPlayer(getAudioContext(), () => this.onPlaybackIdle());
    this.socket = new WebSocket(wsUrl("v1/audio/speech/stream/ws"));
    this.socket.binaryType = "arraybuffer";
    this.socket.addEventListener("open", () => this.onOpen());
    this.socket.addEventListener("message", (event) => this.onMessage(event));
    this.socket.addEventListener("close", (event) => this.onClose(event));
    setStatus("connecting", "Connecting…");
  }

  onOpen() {
    if (apiKey()) this.socket.send(JSON.stringify({ type: "auth", api_key: apiKey() }));
    this.socket.send(JSON.stringify({ ...this.request, segment_id: 1, continue: true }));
    setStatus("connecting", "Waiting for the first audio…");
  }

  onMessage(event) {
    if (this.finished) return;
    if (typeof event.data !== "string") {
      this.onAudio(new Uint8Array(event.data));
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      this.fail("Unexpected reply", "The server sent a text frame that is not JSON.");
      return;
    }
    if (message.type === "start") {
      setStatus("streaming", `Streaming ${message.voice}…`);
    } else if (message.type === "end") {
      this.onEnd(message);
    } else if (message.type === "error") {
      this.fail("The server reported an error", message.message, message.code);
    }
  }

  onAudio(bytes) {
    if (this.carry) {
      const joined = new Uint8Array(this.carry.length + bytes.length);
      joined.set(this.carry);
      joined.set(bytes, this.carry.length);
      bytes = joined;
      this.carry = null;
    }
    if (bytes.length % 2) {
      this.carry = bytes.slice(-1);
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    if (bytes.length === 0) return;
    if (this.firstAudioAt === null) {
      this.firstAudioAt = performance.now();
      const ttfaMs = this.firstAudioAt - this.startedAt;
      ui.ttfa.textContent = formatSeconds(ttfaMs / 1000);
      ui.status.dataset.ttfaMs = ttfaMs.toFixed(1);
      setStatus("streaming", "Playing while streaming…");
    }
    this.chunks.push(bytes.slice());
    this.byteLength += bytes.length;
    const samples = this.byteLength / 2;
    ui.status.dataset.receivedSamples = String(samples);
    ui.received.textContent = `${formatSeconds(samples / SAMPLE_RATE)} (${samples} samples)`;
    this.player.play(pcm16ToFloat32(bytes));
  }

  onEnd(message) {
    this.finished = true;
    this.socket.close(1000);
    const elapsedS = (performance.now() - this.startedAt) / 1000;
    const received = this.byteLength / 2;
    ui.status.dataset.endSamples = String(message.samples);
    if (received !== message.samples) {
      showError(
        "Incomplete audio",
        `received ${received} samples, the server sent ${message.samples}.`,
      );
    }
    if (message.duration_s > 0) {
      const rtf = elapsedS / message.duration_s;
      ui.status.dataset.rtf = rtf.toFixed(4);
      ui.rtf.textContent = `${rtf.toFixed(3)} (${(1 / rtf).toFixed(1)}× real time)`;
    }
    setDownload(wavBlob(this.chunks, this.byteLength));
    setStatus(
      "done",
      `Done: ${formatSeconds(message.duration_s)} of audio in ${formatSeconds(elapsedS)}.`,
    );
    this.onPlaybackIdle();
  }

  onClose(event) {
    if (this.finished) return;
    const reason = event.reason ? `: ${event.reason}` : "";
    this.fail(
      "Connection lost",
      `the WebSocket closed before the end of the audio (code ${event.code}${reason}).`,
    );
  }

  fail(title, message, code) {
    this.finished = true;
    this.socket.close(1000);
    this.player.stop();
    showError(title, message, code);
    setStatus("error", "Failed.");
    this.onPlaybackIdle();
  }

  cancel() {
    if (!this.finished) {
      this.finished = true;
      this.socket.close(1000); // the server stops the synthesis when the client leaves
      setStatus("stopped", "Stopped.");
    }
    this.player.stop();
    this.onPlaybackIdle();
  }

  onPlaybackIdle() {
    if (current === this && this.finished && !this.player.playing) ui.stop.disabled = true;
  }
}

// -- wiring -----------------------------------------------------------------------

async function speak() {
  current?.cancel();
  clearError();
  resetMetrics();
  setDownload(null);
  const context = getAudioContext();
  await context.resume();
  current = new Synthesis({
    input: ui.text.value,
    voice: ui.voice.value || null,
    temperature: Number(ui.temperature.value),
  });
  ui.stop.disabled = false;
}

async function errorMessageOf(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadVoices() {
  try {
    const [voicesResponse, info] = await Promise.all([
      fetch(apiUrl("v1/voices"), { headers: authHeaders() }),
      fetch(apiUrl("."), { headers: authHeaders() })
        .then((response) => (response.ok ? response.json() : null))
        .catch(() => null),
    ]);
    if (!voicesResponse.ok) throw new Error(await errorMessageOf(voicesResponse));
    const { voices } = await voicesResponse.json();
    ui.voice.replaceChildren(
      ...voices.map((voice) => {
        const label = `${voice.language}, ${voice.gender} (${voice.id})`;
        return new Option(label, voice.id, false, voice.id === info?.default_voice);
      }),
    );
    ui.voice.disabled = false;
    ui.speak.disabled = false;
    setStatus("idle", "Ready.");
  } catch (error) {
    ui.voice.replaceChildren(new Option("No voices", ""));
    showError("Could not load the voices", error.message);
    setStatus("error", "The voices could not be loaded.");
  }
}

ui.speak.disabled = true;
ui.temperature.addEventListener("input", () => {
  ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
});
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  speak().catch((error) => {
    showError("Could not start audio", error.message);
    setStatus("error", "Failed.");
  });
});
ui.apiKey.addEventListener("change", () => {
  ui.error.hidden = true;
  loadVoices();
});
ui.stop.addEventListener("click", () => current?.cancel());
ui.download.addEventListener("click", saveDownload);
ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
setStatus("idle", "Loading voices…");
loadVoices();
