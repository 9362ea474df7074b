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
//
// Voices panel: clone a voice from a file or a microphone recording (MediaRecorder)
// with POST v1/audio/voices (multipart: audio_sample, name and optional fields), delete
// a cloned one with DELETE v1/audio/voices/{name}. GET v1/voices lists every voice
// (cloned: true for the clones); GET . says whether the server can clone (cloning).
// #clone-status carries data-state (idle | recording | recorded | invalid | uploading |
// added | deleting | deleted | error).
//
// Design panel: POST v1/audio/voices/design {gender, pitch, speed, candidates, text?}
// gives candidates {global_tokens, audio (a WAV data URL)}, each auditioned in an
// <audio>; POST v1/audio/voices with JSON {name, global_tokens, gender} keeps one.
// #design-status carries data-state (idle | designing | designed | invalid | saving |
// saved | error).
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

const voicesUi = {
  note: document.getElementById("cloning-note"),
  form: document.getElementById("clone-form"),
  file: document.getElementById("clip-file"),
  record: document.getElementById("record"),
  recordStop: document.getElementById("record-stop"),
  recordTime: document.getElementById("record-time"),
  recordHint: document.getElementById("record-hint"),
  preview: document.getElementById("preview"),
  previewAudio: document.getElementById("clip-preview"),
  clipSummary: document.getElementById("clip-summary"),
  name: document.getElementById("voice-name"),
  language: document.getElementById("voice-language"),
  gender: document.getElementById("voice-gender"),
  description: document.getElementById("voice-description"),
  refText: document.getElementById("voice-ref-text"),
  baseVoice: document.getElementById("base-voice"),
  consent: document.getElementById("voice-consent"),
  add: document.getElementById("add-voice"),
  status: document.getElementById("clone-status"),
  error: document.getElementById("clone-error"),
  selectedVoice: document.getElementById("selected-voice"),
  selectedKind: document.getElementById("selected-kind"),
  deleteVoice: document.getElementById("delete-voice"),
  confirm: document.getElementById("delete-confirm"),
  confirmQuestion: document.getElementById("delete-question"),
  confirmYes: document.getElementById("delete-yes"),
  confirmNo: document.getElementById("delete-no"),
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

function fillError(element, title, message, code) {
  element.replaceChildren();
  const heading = document.createElement("strong");
  heading.textContent = title;
  element.append(heading, document.createTextNode(message));
  if (code) {
    const codeElement = document.createElement("code");
    codeElement.textContent = ` (${code})`;
    element.append(codeElement);
  }
  element.hidden = false;
}

function showError(title, message, code) {
  fillError(ui.error, title, message, code);
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

/** The gateway's {"error": {message, code, param}}, or what can be said without it. */
async function errorOf(response) {
  try {
    const { error } = await response.json();
    if (typeof error?.message === "string") return error;
  } catch {
    // not JSON: a proxy's page, say
  }
  return { message: `HTTP ${response.status} ${response.statusText}`.trim(), code: null };
}

async function errorMessageOf(response) {
  return (await errorOf(response)).message;
}

let voicesById = new Map(); // id -> {id, speaker_id, language, gender, cloned}
let defaultVoice = null;

function voiceLabel(voice) {
  const about = [voice.language, voice.gender].filter(Boolean).join(", ");
  if (voice.cloned) return about ? `${voice.id} (cloned): ${about}` : `${voice.id} (cloned)`;
  return `${about} (${voice.id})`;
}

function optionGroup(label, voices, selected) {
  const group = document.createElement("optgroup");
  group.label = label;
  group.append(...voices.map((v) => new Option(voiceLabel(v), v.id, false, v.id === selected)));
  return group;
}

/** Fills the voice pickers; selects `select`, else the current voice, else the default. */
async function loadVoices(select = null) {
  try {
    const [voicesResponse, info] = await Promise.all([
      fetch(apiUrl("v1/voices"), { headers: authHeaders() }),
      fetch(apiUrl("."), { headers: authHeaders() })
        .then((response) => (response.ok ? response.json() : null))
        .catch(() => null),
    ]);
    showCloning(info);
    if (!voicesResponse.ok) throw new Error(await errorMessageOf(voicesResponse));
    const { voices } = await voicesResponse.json();
    voicesById = new Map(voices.map((voice) => [voice.id, voice]));
    defaultVoice = info?.default_voice ?? null;
    const wanted = [select, ui.voice.value, defaultVoice].find((id) => voicesById.has(id));
    const packaged = voices.filter((voice) => !voice.cloned);
    const cloned = voices.filter((voice) => voice.cloned);
    ui.voice.replaceChildren(optionGroup("Built-in voices", packaged, wanted));
    if (cloned.length) ui.voice.append(optionGroup("Cloned voices", cloned, wanted));
    const base = voicesUi.baseVoice.value;
    voicesUi.baseVoice.replaceChildren(
      new Option("The server’s choice", ""),
      ...packaged.map((v) => new Option(voiceLabel(v), v.id, false, v.id === base)),
    );
    ui.voice.disabled = false;
    ui.speak.disabled = false;
    setStatus("idle", "Ready.");
  } catch (error) {
    voicesById = new Map();
    ui.voice.replaceChildren(new Option("No voices", ""));
    showError("Could not load the voices", error.message);
    setStatus("error", "The voices could not be loaded.");
  }
  showSelectedVoice();
}

// -- voices panel: clone, delete ------------------------------------------------------

const VOICE_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_CLIP_BYTES = 10 * 1024 * 1024; // the server's limit (413 above it)
const MIN_CLIP_S = 0.5;
const MAX_RECORDING_S = 60;
const RECORDING_TYPES = [
  "audio/webm;codecs=opus",
  "audio/ogg;codecs=opus",
  "audio/webm",
  "audio/mp4",
];

let clip = null; // {blob, filename, seconds (recordings only)}
let recording = null; // {recorder, stream, chunks, startedAt, timer}
let previewUrl = null;

function setCloneStatus(state, text) {
  voicesUi.status.dataset.state = state;
  voicesUi.status.textContent = text;
}

function showCloneError(title, message, code) {
  fillError(voicesUi.error, title, message, code);
}

function clearCloneError() {
  voicesUi.error.hidden = true;
  voicesUi.error.replaceChildren();
  voicesUi.name.removeAttribute("aria-invalid");
}

/** What GET / said: the clone form, or a note saying why there is none. */
function showCloning(info) {
  const available = info?.cloning === true;
  voicesUi.form.hidden = !available;
  voicesUi.note.hidden = available;
  if (available) return;
  if (recording) stopRecording();
  voicesUi.note.textContent =
    info === null
      ? "Voice cloning: the server's information (GET /) could not be loaded, so adding " +
        "voices is off. If the server has an API key, type it above."
      : "Voice cloning is not available on this server: its BiCodec checkpoint has no " +
        "speaker encoder. Voices cloned elsewhere into its library can still be used " +
        "and deleted.";
}

function showSelectedVoice() {
  const voice = voicesById.get(ui.voice.value);
  voicesUi.selectedVoice.textContent = voice ? voice.id : "–";
  voicesUi.selectedKind.textContent = !voice
    ? ""
    : voice.cloned
      ? "(cloned)"
      : "(built-in: cannot be deleted)";
  voicesUi.deleteVoice.disabled = !voice?.cloned;
  hideConfirm(false);
}

function formatBytes(bytes) {
  return bytes < 1024 * 1024
    ? `${Math.max(1, Math.round(bytes / 1024))} kB`
    : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function setClip(newClip) {
  clip = newClip;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = clip ? URL.createObjectURL(clip.blob) : null;
  voicesUi.preview.hidden = !clip;
  if (!clip) {
    voicesUi.previewAudio.removeAttribute("src");
    voicesUi.clipSummary.textContent = "";
    return;
  }
  voicesUi.previewAudio.src = previewUrl;
  const size = formatBytes(clip.blob.size);
  voicesUi.clipSummary.textContent =
    clip.seconds === undefined
      ? `File ${clip.filename}, ${size}.`
      : `Recording, ${clip.seconds.toFixed(1)} s, ${size} (${clip.blob.type || "audio"}).`;
}

function recordingProblem() {
  if (!window.isSecureContext) {
    return "Recording needs a secure page (HTTPS, or localhost); choose a file instead.";
  }
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
    return "This browser cannot record audio (MediaRecorder); choose a file instead.";
  }
  return null;
}

function extensionOf(mimeType) {
  if (mimeType.includes("ogg")) return "ogg";
  if (mimeType.includes("mp4")) return "m4a";
  return "webm";
}

function showRecordTime(seconds) {
  voicesUi.recordTime.textContent = `${seconds.toFixed(1)} s`;
}

async function startRecording() {
  clearCloneError();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showCloneError("Could not use the microphone", error.message || error.name);
    setCloneStatus("error", "Recording failed.");
    return;
  }
  const mimeType = RECORDING_TYPES.find((type) => MediaRecorder.isTypeSupported(type));
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
  const current = { recorder, stream, chunks: [], startedAt: performance.now(), timer: null };
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size > 0) current.chunks.push(event.data);
  });
  recorder.addEventListener("stop", () => finishRecording(current));
  current.timer = setInterval(() => {
    const seconds = (performance.now() - current.startedAt) / 1000;
    showRecordTime(seconds);
    if (seconds >= MAX_RECORDING_S) stopRecording();
  }, 100);
  recording = current;
  recorder.start();
  setClip(null);
  voicesUi.file.value = "";
  voicesUi.file.disabled = true;
  voicesUi.record.disabled = true;
  voicesUi.recordStop.disabled = false;
  voicesUi.add.disabled = true;
  voicesUi.recordStop.focus();
  showRecordTime(0);
  voicesUi.recordTime.dataset.recording = "true";
  setCloneStatus("recording", "Recording… press “Stop recording” when done.");
}

function stopRecording() {
  if (recording?.recorder.state === "recording") recording.recorder.stop();
}

function finishRecording(current) {
  clearInterval(current.timer);
  for (const track of current.stream.getTracks()) track.stop();
  if (recording === current) recording = null;
  const seconds = (performance.now() - current.startedAt) / 1000;
  showRecordTime(seconds);
  delete voicesUi.recordTime.dataset.recording;
  voicesUi.file.disabled = false;
  voicesUi.record.disabled = false;
  voicesUi.recordStop.disabled = true;
  voicesUi.add.disabled = false;
  const type = current.recorder.mimeType || current.chunks[0]?.type || "audio/webm";
  const blob = new Blob(current.chunks, { type });
  if (blob.size === 0) {
    showCloneError("Nothing was recorded", "The microphone gave no audio.");
    setCloneStatus("error", "Recording failed.");
    return;
  }
  setClip({ blob, filename: `recording.${extensionOf(type)}`, seconds });
  voicesUi.record.focus();
  setCloneStatus(
    "recorded",
    `Recorded ${seconds.toFixed(1)} s. Listen to the preview, name the voice, then add it.`,
  );
}

/** Checks what the browser can check; the server checks the rest. */
function invalidClone(name) {
  if (!clip) return ["No clip", "Choose an audio file or record one first.", voicesUi.file];
  if (clip.blob.size > MAX_CLIP_BYTES) {
    const size = formatBytes(clip.blob.size);
    return ["The clip is too large", `It is ${size}; the server takes at most 10 MB.`, null];
  }
  if (clip.seconds !== undefined && clip.seconds < MIN_CLIP_S) {
    return ["The recording is too short", `Record at least ${MIN_CLIP_S} s.`, null];
  }
  if (!VOICE_NAME.test(name)) {
    const title = name ? `“${name}” is not a valid name` : "The voice needs a name";
    return [title, "Use 1 to 64 letters, digits, _ or - (no spaces).", voicesUi.name];
  }
  return null;
}

async function addVoice() {
  clearCloneError();
  const name = voicesUi.name.value.trim();
  const problem = invalidClone(name);
  if (problem) {
    const [title, message, field] = problem;
    showCloneError(title, message);
    if (field === voicesUi.name) voicesUi.name.setAttribute("aria-invalid", "true");
    field?.focus();
    setCloneStatus("invalid", "Not added.");
    return;
  }
  const body = new FormData();
  body.append("audio_sample", clip.blob, clip.filename);
  body.append("name", name);
  const optional = {
    language: voicesUi.language.value.trim(),
    gender: voicesUi.gender.value,
    speaker_description: voicesUi.description.value.trim(),
    ref_text: voicesUi.refText.value.trim(),
    base_voice: voicesUi.baseVoice.value,
    consent: voicesUi.consent.checked ? "The speaker agreed to have their voice cloned." : "",
  };
  for (const [key, value] of Object.entries(optional)) if (value) body.append(key, value);

  voicesUi.add.disabled = true;
  setCloneStatus("uploading", `Cloning “${name}”…`);
  try {
    const response = await fetch(apiUrl("v1/audio/voices"), {
      method: "POST",
      headers: authHeaders(),
      body,
    });
    if (!response.ok) {
      const error = await errorOf(response);
      showCloneError("The server did not add the voice", error.message, error.code);
      if (error.param === "name") {
        voicesUi.name.setAttribute("aria-invalid", "true");
        voicesUi.name.focus();
      }
      setCloneStatus("error", "Not added.");
      return;
    }
    const { voice } = await response.json();
    voicesUi.form.reset();
    setClip(null);
    showRecordTime(0);
    await loadVoices(voice.id);
    setCloneStatus(
      "added",
      `Added the voice “${voice.id}”; it is selected in the voice picker.`,
    );
  } catch (error) {
    showCloneError("Could not upload the clip", error.message);
    setCloneStatus("error", "Not added.");
  } finally {
    voicesUi.add.disabled = recording !== null;
  }
}

function askToDelete() {
  const voice = voicesById.get(ui.voice.value);
  if (!voice?.cloned) return;
  clearCloneError();
  voicesUi.confirm.dataset.voice = voice.id;
  voicesUi.confirmQuestion.textContent =
    `Delete the cloned voice “${voice.id}”? This cannot be undone.`;
  voicesUi.confirm.hidden = false;
  voicesUi.deleteVoice.disabled = true;
  voicesUi.confirmNo.focus();
}

function hideConfirm(refocus) {
  if (voicesUi.confirm.hidden) return;
  voicesUi.confirm.hidden = true;
  delete voicesUi.confirm.dataset.voice;
  voicesUi.deleteVoice.disabled = !voicesById.get(ui.voice.value)?.cloned;
  if (refocus) voicesUi.deleteVoice.focus();
}

async function deleteVoice() {
  const name = voicesUi.confirm.dataset.voice;
  if (!name) return;
  voicesUi.confirmYes.disabled = true;
  setCloneStatus("deleting", `Deleting “${name}”…`);
  try {
    const response = await fetch(apiUrl(`v1/audio/voices/${encodeURIComponent(name)}`), {
      method: "DELETE",
      headers: authHeaders(),
    });
    if (!response.ok) {
      const error = await errorOf(response);
      showCloneError("The server did not delete the voice", error.message, error.code);
      setCloneStatus("error", "Not deleted.");
      hideConfirm(true);
      return;
    }
    hideConfirm(false);
    await loadVoices(ui.voice.value === name ? defaultVoice : null);
    setCloneStatus("deleted", `Deleted the voice “${name}”.`);
    ui.voice.focus();
  } catch (error) {
    showCloneError("Could not delete the voice", error.message);
    setCloneStatus("error", "Not deleted.");
    hideConfirm(true);
  } finally {
    voicesUi.confirmYes.disabled = false;
  }
}

function wireVoicesPanel() {
  const problem = recordingProblem();
  if (problem) {
    voicesUi.record.disabled = true;
    voicesUi.recordHint.textContent = problem;
    voicesUi.recordHint.hidden = false;
  }
  voicesUi.file.addEventListener("change", () => {
    clearCloneError();
    const file = voicesUi.file.files[0];
    setClip(file ? { blob: file, filename: file.name } : null);
    setCloneStatus("idle", file ? `Chose ${file.name}.` : "");
  });
  voicesUi.record.addEventListener("click", () => startRecording());
  voicesUi.recordStop.addEventListener("click", stopRecording);
  voicesUi.name.addEventListener("input", () => voicesUi.name.removeAttribute("aria-invalid"));
  voicesUi.form.addEventListener("submit", (event) => {
    event.preventDefault();
    addVoice();
  });
  voicesUi.deleteVoice.addEventListener("click", askToDelete);
  voicesUi.confirmNo.addEventListener("click", () => hideConfirm(true));
  voicesUi.confirmYes.addEventListener("click", () => deleteVoice());
  voicesUi.confirm.addEventListener("keydown", (event) => {
    if (event.key === "Escape") hideConfirm(true);
  });
  ui.voice.addEventListener("change", showSelectedVoice);
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
// -- design panel: labels -> candidates -> a saved voice -------------------------------

const designUi = {
  form: document.getElementById("design-form"),
  gender: document.getElementById("design-gender"),
  pitch: document.getElementById("design-pitch"),
  speed: document.getElementById("design-speed"),
  count: document.getElementById("design-count"),
  text: document.getElementById("design-text"),
  design: document.getElementById("design"),
  status: document.getElementById("design-status"),
  error: document.getElementById("design-error"),
  candidates: document.getElementById("design-candidates"),
  saveForm: document.getElementById("design-save-form"),
  pick: document.getElementById("design-pick"),
  name: document.getElementById("design-name"),
  save: document.getElementById("design-save"),
};

let designed = []; // the latest candidates: {global_tokens, audio, duration_s}
let designedGender = null;

function setDesignStatus(state, text) {
  designUi.status.dataset.state = state;
  designUi.status.textContent = text;
}

function showDesignError(title, message, code) {
  fillError(designUi.error, title, message, code);
}

function showCandidates(candidates) {
  designUi.candidates.replaceChildren(
    ...candidates.map((candidate, index) => {
      const item = document.createElement("li");
      const label = document.createElement("span");
      label.id = `design-candidate-${index + 1}`;
      label.textContent = `Candidate ${index + 1} (${candidate.duration_s.toFixed(1)} s)`;
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "metadata";
      audio.src = candidate.audio;
      audio.setAttribute("aria-labelledby", label.id);
      item.append(label, audio);
      return item;
    }),
  );
  designUi.pick.replaceChildren(
    ...candidates.map((_, index) => new Option(`Candidate ${index + 1}`, String(index))),
  );
  designUi.saveForm.hidden = candidates.length === 0;
}

async function designVoices() {
  designUi.error.hidden = true;
  const body = {
    gender: designUi.gender.value,
    pitch: designUi.pitch.value,
    speed: designUi.speed.value,
    candidates: Number(designUi.count.value),
  };
  const text = designUi.text.value.trim();
  if (text) body.text = text;
  designUi.design.disabled = true;
  setDesignStatus("designing", "Designing voices…");
  try {
    const response = await fetch(apiUrl("v1/audio/voices/design"), {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await errorOf(response);
      showDesignError("The server did not design voices", error.message, error.code);
      setDesignStatus("error", "No voices designed.");
      return;
    }
    designed = (await response.json()).candidates;
    designedGender = body.gender;
    showCandidates(designed);
    setDesignStatus("designed", `${designed.length} candidates: listen, then keep one.`);
  } catch (error) {
    showDesignError("Could not reach the server", error.message);
    setDesignStatus("error", "No voices designed.");
  } finally {
    designUi.design.disabled = false;
  }
}

async function saveDesigned() {
  designUi.error.hidden = true;
  const name = designUi.name.value.trim();
  const candidate = designed[Number(designUi.pick.value)];
  if (!VOICE_NAME.test(name)) {
    showDesignError("The voice needs a valid name", "Use 1 to 64 letters, digits, _ or -.");
    designUi.name.focus();
    setDesignStatus("invalid", "Not saved.");
    return;
  }
  designUi.save.disabled = true;
  setDesignStatus("saving", `Saving “${name}”…`);
  try {
    const response = await fetch(apiUrl("v1/audio/voices"), {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({
        name,
        global_tokens: candidate.global_tokens,
        gender: designedGender,
      }),
    });
    if (!response.ok) {
      const error = await errorOf(response);
      showDesignError("The server did not save the voice", error.message, error.code);
      setDesignStatus("error", "Not saved.");
      return;
    }
    const { voice } = await response.json();
    designUi.name.value = "";
    await loadVoices(voice.id);
    setDesignStatus("saved", `Saved the voice “${voice.id}”; it is selected in the voice picker.`);
  } catch (error) {
    showDesignError("Could not save the voice", error.message);
    setDesignStatus("error", "Not saved.");
  } finally {
    designUi.save.disabled = false;
  }
}

designUi.form.addEventListener("submit", (event) => {
  event.preventDefault();
  designVoices();
});
designUi.saveForm.addEventListener("submit", (event) => {
  event.preventDefault();
  saveDesigned();
});

wireVoicesPanel();
setStatus("idle", "Loading voices…");
loadVoices();
