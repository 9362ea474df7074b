"""The tooling of scripts/compose_check.sh, checked without a Docker engine.

The script itself builds both images and runs the stack; scripts/test.sh runs it after
this suite (it takes minutes, and needs root or an engine). Here:

- devtools.compose_check, the checker it runs through the published port, against a
  real gateway process (the stand-in LLM behind it, the small BiCodec with a speaker
  encoder): every check passes on a working gateway, and each one fails on a broken
  answer;
- its wheel index: a folder of wheels made into a PEP 503 index that pip installs from,
  served by `python -m http.server` as the script serves it;
- the script's skips: where it cannot run it says why and exits 77, which
  scripts/test.sh reports as a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools import compose_check
from devtools.gateway_server import GatewayServer
from devtools.paths import GOLDEN_SPEAKER, REPO
from devtools.process import ServerProcess, free_port

SCRIPT = REPO / "scripts" / "compose_check.sh"
CLIP = GOLDEN_SPEAKER / "clips" / "case_0.wav"


def lines(output: str, kind: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{kind}: ")]


@pytest.fixture
def cloning_gateway(make_gateway: Callable[..., GatewayServer], tmp_path: Path) -> GatewayServer:
    return make_gateway(BICODEC_DIR=str(GOLDEN_SPEAKER), VOICE_LIBRARY_DIR=str(tmp_path / "v"))


def test_checker_passes_on_a_working_gateway(
    cloning_gateway: GatewayServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, tokens = cloning_gateway.url, tmp_path / "tokens.json"
    speak = ["speak", url, "--clip", str(CLIP), "--voice-name", "ck", "--save", str(tokens)]
    assert compose_check.main(speak) == 0
    out = capsys.readouterr().out
    assert lines(out, "FAIL") == []
    assert len(lines(out, "PASS")) == 7, out
    assert len(json.loads(tokens.read_text())) == 32
    # Again on the same library: the voice left by a run before is replaced.
    assert compose_check.main(speak) == 0
    assert lines(capsys.readouterr().out, "FAIL") == []

    assert (
        compose_check.main(["cloned-voice", url, "--voice-name", "ck", "--expect", str(tokens)])
        == 0
    )
    assert len(lines(capsys.readouterr().out, "PASS")) == 1

    assert compose_check.main(["first-audio", url, "--label", "here", "--runs", "2"]) == 0
    (figure,) = lines(capsys.readouterr().out, "NUMBER")
    assert figure.startswith("NUMBER: first audio, here: median ")
    assert "2 requests after one warm-up" in figure


def test_checker_fails_what_does_not_hold(
    cloning_gateway: GatewayServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, tokens = cloning_gateway.url, tmp_path / "tokens.json"
    # The voice was never cloned on this gateway: it is not there after "the restart".
    tokens.write_text(json.dumps([1] * 32))
    assert (
        compose_check.main(["cloned-voice", url, "--voice-name", "nobody", "--expect", str(tokens)])
        == 1
    )
    (failure,) = lines(capsys.readouterr().out, "FAIL")
    assert "'nobody' is gone" in failure
    # Nothing listens there: every check fails, none crashes.
    dead = f"http://127.0.0.1:{free_port()}"
    speak = ["speak", dead, "--clip", str(CLIP), "--voice-name", "ck", "--save", str(tokens)]
    assert compose_check.main(speak) == 1
    out = capsys.readouterr().out
    assert len(lines(out, "FAIL")) == 7 and lines(out, "PASS") == []
    # A kill command that does not work is a failed check, not a crash.
    assert compose_check.main(["kill-llm", url, "--", "false"]) == 1
    assert "CalledProcessError" in lines(capsys.readouterr().out, "FAIL")[0]


def test_is_mp3() -> None:
    assert compose_check.is_mp3(b"ID3\x04\x00") and compose_check.is_mp3(b"\xff\xfb\x90\x00")
    assert not compose_check.is_mp3(b"RIFF....WAVE") and not compose_check.is_mp3(b"")


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal, valid pure-Python wheel of distribution ``name``."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist}/__init__.py", "")
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_wheel_index_serves_pip(tmp_path: Path) -> None:
    files = tmp_path / "index" / "files"
    files.mkdir(parents=True)
    _wheel(files, "Demo_Pkg.Sub", "1.0")
    _wheel(files, "demo-pkg-sub", "2.0+cpu")  # a local version, like torch's +cpu
    _wheel(files, "other", "0.1")
    assert compose_check.wheel_index(tmp_path / "index") == 2
    assert compose_check.wheel_index(tmp_path / "index") == 2  # again: nothing changes
    project = tmp_path / "index" / "simple" / "demo-pkg-sub"
    assert sorted(p.name for p in project.iterdir()) == [
        "Demo_Pkg.Sub-1.0-py3-none-any.whl",
        "demo_pkg_sub-2.0+cpu-py3-none-any.whl",
    ]
    assert all(p.is_symlink() and p.resolve().parent == files for p in project.iterdir())

    port = free_port()
    server = ServerProcess(
        "wheel index",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(tmp_path / "index")],
        log_path=tmp_path / "index.log",
        health_url=f"http://127.0.0.1:{port}/simple/",
    )  # fmt: skip
    # Only this index: no pip configuration of the machine (find-links, other indexes).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with server:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp_path / "out"),
             "--index-url", f"http://127.0.0.1:{port}/simple", "demo-pkg-sub==2.0+cpu", "other"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "demo_pkg_sub-2.0+cpu-py3-none-any.whl",
        "other-0.1-py3-none-any.whl",
    ]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run_script(tmp_path: Path, *args: str, **stubs: str) -> subprocess.CompletedProcess[str]:
    """scripts/compose_check.sh with commands replaced by stubs (name -> shell body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        _stub(bin_dir, name, body)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "COMPOSE_CHECK_CACHE": str(tmp_path / "cache")}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_script_skips_off_linux(tmp_path: Path) -> None:
    result = _run_script(tmp_path, uname="echo Darwin")
    assert result.returncode == 77
    assert "SKIPPED: needs Linux" in result.stderr


def test_script_skips_without_an_engine_or_root(tmp_path: Path) -> None:
    result = _run_script(tmp_path, docker="exit 1", id="echo 1000")
    assert result.returncode == 77
    assert "SKIPPED: no Docker engine answers and this is not root" in result.stderr


def test_script_usage_and_down_without_a_stack(tmp_path: Path) -> None:
    result = _run_script(tmp_path, "sideways")
    assert result.returncode == 1 and "usage: bash scripts/compose_check.sh [down]" in result.stderr
    result = _run_script(tmp_path, "down")
    assert result.returncode == 1 and "no stack of this script to take down" in result.stderr


def test_test_command_runs_the_check_and_reports_its_skip() -> None:
    """scripts/test.sh runs the script after pytest, and exit 77 is a skip it prints."""
    text = (REPO / "scripts" / "test.sh").read_text(encoding="utf-8")
    pytest_at = text.index(".venv/bin/python -m pytest")
    check_at = text.index("bash scripts/compose_check.sh")
    assert pytest_at < check_at
    assert "status == 77" in text[check_at:] and "skipped" in text[check_at:]
