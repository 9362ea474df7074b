"""README.md and the pages of docs/ kept honest: their client examples run as written
against a real gateway, and the test command (README.md), the configuration table
(docs/configuration.md), the voices (docs/api.md) and the runtime dependencies
(docs/architecture.md) match the code. tests/test_docs.py checks their links.

Which blocks run
----------------
A fenced code block runs when its info string (the text after the opening fence) is
exactly one of ``python``, ``js``, ``javascript``, ``bash`` or ``sh``, with nothing
after the language. Every other block is documentation only: another language
(``console``, ``text``, ``json``, ``yaml``, ...) or a language followed by
attributes, such as ``js title="browser only, not run"`` or ``bash title="not run"``.

The pages are README.md and every ``docs/*.md``. Every runnable block of every page
must be claimed by exactly one example kind below (so an example added to a page
without a test fails the suite), and every kind must find exactly one block, on
whichever page it lives.

How they run
------------
The examples name the gateway as ``localhost:8001``. The only change made to a
block is replacing each ``localhost:8001`` with the test gateway's ``127.0.0.1:PORT``
(``http://`` and ``ws://`` URLs alike). A block runs in a fresh temporary folder:
``python`` blocks as a file with this interpreter (the test virtual environment),
``js`` blocks as ``speech.mjs`` with ``node`` (Node 18 or newer must be installed:
missing, the test fails), ``bash`` blocks as a file with ``bash -e -o pipefail``
(``curl`` and ``ffmpeg`` must be installed; ``scripts/test.sh`` installs ffmpeg).
``PATH`` starts with this interpreter's folder, so ``python`` is the test virtual
environment's, as in an activated venv, and ``GATEWAY_API_KEY`` is removed from the
environment (the test gateway has no key).

The gateway talks to the deterministic stand-in LLM (10 speech tokens per word of
each sentence, 320 samples per token), so the exact length of every file is known
from the example's own text, which is read out of the block.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

from decoder_gateway.audio.encoders import resampled_length
from decoder_gateway.llm.prompt import speaker_prompt
from decoder_gateway.settings import Settings
from decoder_gateway.text import split_segments
from decoder_gateway.voices.catalog import VoiceCatalog
from devtools.gateway_server import REPO
from devtools.paths import GOLDEN_SPEAKER
from devtools.standin_llm import expected_semantic_count

README = REPO / "README.md"
DOCS = REPO / "docs"
README_HOST = "localhost:8001"
RUNNABLE = {"python": "python", "js": "js", "javascript": "js", "bash": "bash", "sh": "bash"}
SAMPLES_PER_TOKEN = 320
MODEL_RATE = 16000
MP3_SLACK = 3 * 1152  # encoder delay and padding an MP3 may add (no gapless info)
VOICES = VoiceCatalog.load()


# -- reading the pages -----------------------------------------------------------


@dataclass(frozen=True)
class Block:
    info: str  # the fence's info string, stripped
    code: str
    line: int  # 1-based line of the opening fence
    page: str = "README.md"  # the page, relative to the repository root

    @property
    def language(self) -> str | None:
        """The runner of a runnable block (python, js, bash), else None."""
        return RUNNABLE.get(self.info)

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def pages() -> list[Path]:
    """README.md, then every page of docs/ in name order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def page_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def page_text(name: str) -> str:
    """The text of a page, by its path relative to the repository root."""
    path = REPO / name
    assert path.is_file(), f"{name} is missing"
    return path.read_text(encoding="utf-8")


def readme_text() -> str:
    return page_text("README.md")


def fenced_blocks(text: str, page: str = "README.md") -> list[Block]:
    """Every fenced code block (``` or ~~~, at most three spaces of indentation)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r" {0,3}(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.fullmatch(
            rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[j]
        ):
            body.append(lines[j])
            j += 1
        blocks.append(Block(info, "\n".join(body) + "\n", i + 1, page))
        i = j + 1
    return blocks


def section(text: str, heading: str, page: str = "README.md") -> str:
    """The text of a ``## heading`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no '## {heading}' section"
    return match.group(1)


def page_section(page: str, heading: str) -> str:
    """The ``## heading`` section of a page (README.md or docs/NAME.md)."""
    return section(page_text(page), heading, page)


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header and separator rows too)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.lstrip().startswith("|")
    ]


def spoken_texts(code: str) -> list[str]:
    """The texts an example asks to be spoken: the non-empty string values of ``text``
    or ``input`` (JSON, JavaScript, Python keyword arguments), in order."""
    return re.findall(r"""["']?\b(?:text|input)\b["']?\s*[:=]\s*"([^"]+)\"""", code)


def expected_samples(text: str, voice: str = "luganda_female") -> int:
    """Samples at 16 kHz the gateway streams for ``text`` with the stand-in LLM."""
    v = VOICES.resolve(voice)
    tokens = sum(
        expected_semantic_count(speaker_prompt(v, segment)) for segment in split_segments(text)
    )
    assert tokens > 0
    return tokens * SAMPLES_PER_TOKEN


# -- running an example ----------------------------------------------------------


def run_block(block: Block, gateway, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run a runnable block as written, the gateway's address put in for localhost:8001."""
    assert README_HOST in block.code, (
        f"{block.where}: a runnable example must name the gateway as "
        f"{README_HOST} (the one thing the test replaces)"
    )
    host = gateway.url.removeprefix("http://")
    code = block.code.replace(README_HOST, host)
    env = {key: value for key, value in os.environ.items() if key != "GATEWAY_API_KEY"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if block.language == "python":
        (workdir / "example.py").write_text(code, encoding="utf-8")
        command = [sys.executable, "example.py"]
    elif block.language == "js":
        node = shutil.which("node")
        if node is None:
            pytest.fail(f"node is not installed; {block.where} (JavaScript) needs Node 18+")
        (workdir / "speech.mjs").write_text(code, encoding="utf-8")
        command = [node, "speech.mjs"]
    else:
        for tool in ("curl", "ffmpeg"):
            if tool in code and shutil.which(tool) is None:
                pytest.fail(f"{tool} is not installed (scripts/test.sh installs ffmpeg as root)")
        (workdir / "example.sh").write_text(code, encoding="utf-8")
        command = ["bash", "-e", "-o", "pipefail", "example.sh"]
    result = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, (
        f"{block.where} ({block.info}) exited with {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n"
        f"--- gateway log\n{gateway.log_tail()}"
    )
    return result


def wav_frames(path: Path, rate: int = MODEL_RATE) -> int:
    """Frames of a PCM16 mono WAV file at ``rate`` (checked)."""
    assert path.is_file(), f"the example did not write {path.name}"
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, rate)
        frames = wav.getnframes()
        assert len(wav.readframes(frames)) == 2 * frames
    return frames


def decoded(path: Path) -> tuple[int, int, int]:
    """(sample rate, channels, samples) of an audio file, decoded by FFmpeg (PyAV)."""
    assert path.is_file(), f"the example did not write {path.name}"
    with av.open(io.BytesIO(path.read_bytes()), "r") as container:
        frames = list(container.decode(container.streams.audio[0]))
    return frames[0].sample_rate, frames[0].layout.nb_channels, sum(f.samples for f in frames)


# -- the examples, and what each must produce ------------------------------------


def check_python_websocket(block: Block, result, workdir: Path) -> None:
    texts = spoken_texts(block.code)
    assert len(texts) == 2, texts
    for number, text in enumerate(texts, start=1):
        assert wav_frames(workdir / f"speech-{number}.wav") == expected_samples(text)
        assert f"speech-{number}.wav: " in result.stdout


def check_python_text_in(block: Block, result, workdir: Path) -> None:
    (reply,) = re.findall(r'REPLY = "([^"]+)"', block.code)
    sentences = split_segments(reply)
    expected = sum(expected_samples(text, voice="swahili_male") for text in sentences)
    assert wav_frames(workdir / "reply.wav") == expected
    assert [line.removeprefix("speaking: ") for line in result.stdout.splitlines()[:-1]] == (
        sentences
    )


def check_python_barge_in(block: Block, result, workdir: Path) -> None:
    """The reply was cut off in its second sentence (the first one sent whole, the
    second one's length not known yet), then the answer was spoken whole."""
    (reply,) = re.findall(r'REPLY = "([^"]+)"', block.code)
    (answer,) = re.findall(r'ANSWER = "([^"]+)"', block.code)
    first = split_segments(reply)[0]
    assert re.fullmatch(rf"cut off after [0-9.]+ s: {re.escape(repr(first))}\n", result.stdout)
    assert wav_frames(workdir / "answer.wav") == expected_samples(answer, voice="swahili_male")


def check_python_http(block: Block, result, workdir: Path) -> None:
    (text,) = spoken_texts(block.code)
    assert wav_frames(workdir / "speech.wav") == expected_samples(text)


def check_node_fetch(block: Block, result, workdir: Path) -> None:
    (text,) = spoken_texts(block.code)
    size = (workdir / "speech.pcm").stat().st_size
    assert size == 2 * expected_samples(text)
    assert f"speech.pcm: {size} bytes" in result.stdout and "at 16000 Hz" in result.stdout


def check_curl_ffmpeg(block: Block, result, workdir: Path) -> None:
    (text,) = spoken_texts(block.code)
    assert wav_frames(workdir / "out.wav") == expected_samples(text)


def check_curl_clone(block: Block, result, workdir: Path) -> None:
    """The clip became a voice, which then spoke the text (with the clip's tokens)."""
    voice = json.loads(result.stdout)["voice"]
    assert voice["name"] == "amina" and len(voice["global_tokens"]) == 32
    (text,) = spoken_texts(block.code)
    assert wav_frames(workdir / "out.wav") == expected_samples(text)


def check_curl_openai(block: Block, result, workdir: Path) -> None:
    (text,) = spoken_texts(block.code)
    rate, channels, samples = decoded(workdir / "speech.flac")
    assert (rate, channels) == (24000, 1)
    assert samples == resampled_length(expected_samples(text), MODEL_RATE, 24000)


def check_cli(block: Block, result, workdir: Path) -> None:
    commands = block.code.replace("\\\n", " ").strip().splitlines()
    assert len(commands) == 2, commands
    for command in commands:
        # The text is the argument after the module, or what `echo` pipes in.
        match = re.search(r'decoder_gateway\.client "([^"]+)"', command) or re.search(
            r'echo "([^"]+)" \|', command
        )
        assert match, command
        output = re.search(r"-o (\S+)", command)
        assert output, command
        assert wav_frames(workdir / output.group(1)) == expected_samples(match.group(1))


def check_openai_sdk(block: Block, result, workdir: Path) -> None:
    streamed_text, whole_text = spoken_texts(block.code)
    rate, channels, samples = decoded(workdir / "speech.mp3")
    assert (rate, channels) == (24000, 1)
    want = resampled_length(expected_samples(streamed_text), MODEL_RATE, 24000)
    assert want <= samples <= want + MP3_SLACK
    wav = (workdir / "speech.wav").read_bytes()
    # A streamed WAV: 44-byte header with "unknown" sizes, then PCM16 at 16 kHz.
    assert wav[:4] == b"RIFF" and int.from_bytes(wav[24:28], "little") == MODEL_RATE
    assert len(wav) - 44 == 2 * expected_samples(whole_text)


@dataclass(frozen=True)
class Example:
    name: str
    language: str
    claims: Callable[[str], bool]  # does this block belong to the example?
    check: Callable[[Block, subprocess.CompletedProcess[str], Path], None]
    # Needs a gateway that can clone (the golden speaker checkpoint) and a clip to clone.
    cloning: bool = False
    # Stand-in settings for its run (the barge-in example wants an LLM at real time).
    standin: dict[str, float] | None = None


EXAMPLES = [
    Example(
        "python-websocket",
        "python",
        lambda c: "import websockets" in c and "input.text" not in c,
        check_python_websocket,
    ),
    Example(
        "python-text-in",
        "python",
        lambda c: "input.text" in c and "input.cancel" not in c,
        check_python_text_in,
    ),
    Example(
        "python-barge-in",
        "python",
        lambda c: "input.cancel" in c,
        check_python_barge_in,
        standin={"tokens_per_s": 50.0},
    ),
    Example("python-requests", "python", lambda c: "import requests" in c, check_python_http),
    Example("python-openai-sdk", "python", lambda c: "from openai import" in c, check_openai_sdk),
    Example("node-fetch", "js", lambda c: "fetch(" in c, check_node_fetch),
    Example(
        "curl-ffmpeg",
        "bash",
        lambda c: "curl " in c and "| ffmpeg" in c and "/v1/audio/voices" not in c,
        check_curl_ffmpeg,
    ),
    Example("curl-clone", "bash", lambda c: "/v1/audio/voices" in c, check_curl_clone, True),
    Example(
        "curl-openai",
        "bash",
        lambda c: "curl " in c and "/v1/audio/speech " in c.replace("\\\n", " "),
        check_curl_openai,
    ),
    Example("cli", "bash", lambda c: "python -m decoder_gateway.client" in c, check_cli),
]


def claimants(block: Block) -> list[Example]:
    return [e for e in EXAMPLES if e.language == block.language and e.claims(block.code)]


def runnable_blocks() -> list[Block]:
    """The runnable blocks of every page (README.md and docs/*.md)."""
    return [
        block
        for path in pages()
        for block in fenced_blocks(path.read_text(encoding="utf-8"), page_name(path))
        if block.language is not None
    ]


def test_every_runnable_block_is_one_tested_example():
    seen: dict[str, int] = {example.name: 0 for example in EXAMPLES}
    for block in runnable_blocks():
        owners = claimants(block)
        assert len(owners) == 1, (
            f"{block.where} ({block.info}): claimed by "
            f"{[e.name for e in owners] or 'no example'}; give it a test in "
            'tests/test_readme.py, or mark it not run (e.g. ```bash title="not run"```)'
        )
        seen[owners[0].name] += 1
    assert all(count == 1 for count in seen.values()), (
        f"each example must be on exactly one page, once: {seen}"
    )


def test_the_pages_are_found():
    names = [page_name(path) for path in pages()]
    assert names[0] == "README.md"
    for page in (
        "docs/api.md",
        "docs/clients.md",
        "docs/configuration.md",
        "docs/architecture.md",
        "docs/cpu.md",
        "docs/kubernetes.md",
    ):
        assert page in names, names


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_as_written(example: Example, gateway, make_gateway, llm, tmp_path):
    (block,) = [b for b in runnable_blocks() if claimants(b) == [example]]
    if example.cloning:
        gateway = make_gateway(BICODEC_DIR=str(GOLDEN_SPEAKER))
        shutil.copy(GOLDEN_SPEAKER / "clips" / "case_0.wav", tmp_path / "amina.wav")
    if example.standin:
        llm.control(**example.standin)
    result = run_block(block, gateway, tmp_path)
    example.check(block, result, tmp_path)
    assert llm.stats()["received"] > 0  # the audio came through the gateway and the LLM


# -- the rest of the page against the code ---------------------------------------


def test_the_test_command_is_documented_and_is_what_ci_runs():
    text = readme_text()
    command = "bash scripts/test.sh"
    assert any(
        command in block.code.splitlines() for block in fenced_blocks(section(text, "Quick start"))
    ), "the Quick start section must show the test command in a code block"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    calls = [line for line in ci.splitlines() if re.match(rf"{re.escape(command)}(\s|$)", line)]
    assert calls, ".ci/run must call bash scripts/test.sh"
    assert all(f"`{line}`" in text for line in calls), "README must quote .ci/run's command"


def default_cell(value: object) -> str:
    """How the configuration table writes a default: `value`, unset (None), empty ("")."""
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    return f"`{value}`"


CONFIGURATION = ("docs/configuration.md", "Variables")
VOICES_SECTION = ("docs/api.md", "Voices")
DEPENDENCIES = ("docs/architecture.md", "Runtime dependencies")


def configuration_rows() -> dict[str, list[str]]:
    rows = table_rows(page_section(*CONFIGURATION))
    assert rows and rows[0][:3] == ["Variable", "Default", "Read by"], rows[:1]
    table: dict[str, list[str]] = {}
    for cells in rows[2:]:
        name = cells[0].strip("`")
        assert name not in table, f"{name} is in the configuration table twice"
        table[name] = cells
    return table


def test_every_setting_is_in_the_configuration_table_with_its_default():
    table = configuration_rows()
    for field_name, field in Settings.model_fields.items():
        variable = field_name.upper()
        assert variable in table, f"{variable} (settings.py) is missing from {CONFIGURATION}"
        default, read_by = table[variable][1], table[variable][2]
        assert default == default_cell(field.default), (variable, default)
        assert "gateway" in read_by, (variable, read_by)


def test_every_deployment_variable_is_in_the_configuration_table():
    """Everything .env.example offers (set or commented out), compose.yaml interpolates
    and launch_vllm.sh reads."""
    table = configuration_rows()
    env_example = (REPO / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", env_example, re.M))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", (REPO / "compose.yaml").read_text()))
    launcher = (REPO / "launch_vllm.sh").read_text(encoding="utf-8")
    names |= set(re.findall(r'^([A-Z][A-Z0-9_]+)="\$\{', launcher, re.M))
    assert {"GPU_DEVICE", "VLLM_IMAGE", "EXTRA_VLLM_ARGS", "TORCH_INDEX_URL"} <= names
    assert sorted(names - set(table)) == []


def test_voices_table_matches_the_packaged_voices():
    text = page_section(*VOICES_SECTION)
    rows = table_rows(text)
    documented = {
        cells[0].strip("`"): (int(cells[1]), cells[2], cells[3].split()[0])
        for cells in rows
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].isdigit()
    }
    packaged = {v.id: (v.speaker_id, v.language, v.gender) for v in VOICES}
    assert documented == packaged
    default = f"| `{VOICES.default_voice}` |"
    default_row = [line for line in text.splitlines() if line.startswith(default)]
    assert len(default_row) == 1 and "(the default)" in default_row[0], default_row


def test_readme_names_the_packaged_voices():
    """The README's opening lists every packaged voice, and which is the default."""
    opening = readme_text().split("\n## ", 1)[0]
    for voice in VOICES:
        assert f"`{voice.id}`" in opening, f"README's opening does not name {voice.id}"
    assert f"`{VOICES.default_voice}` (the default)" in opening


def test_every_runtime_dependency_is_explained():
    # pyproject.toml's [project] dependencies (tomllib is Python 3.11+; 3.10 is supported).
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    listing = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert listing, "pyproject.toml has no dependencies list"
    requirements = re.findall(r'^\s*"([^"]+)"', listing.group(1), re.M)
    assert "fastapi>=0.115" in requirements or any(r.startswith("fastapi") for r in requirements)
    section_text = page_section(*DEPENDENCIES)
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]+\])?", requirement).group(0)
        assert f"| `{name}` |" in section_text, f"{name} is not in {DEPENDENCIES}'s table"
