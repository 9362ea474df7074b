"""The house by domain: imports run downwards only, with no cycle, and the wheel holds
no test tooling.

Every import of the package is read from the source (``ast``), those under ``if
TYPE_CHECKING:`` and inside functions included, so a type-only import cannot hide a
loop. The layers, from the top:

    app, __main__     the factory and the entry point: may import anything
    api               the web edge, the only package that imports FastAPI/Starlette
    serving           a request -> events: admission, scheduler, segments, sessions
    llm, voices       the vLLM client and prompts; the voice catalog, library, cloning
    audio             PCM, encoders, clips
    codec.runtime     spans, batching, stream state, graphs, the decoder facade, worker
    codec.speaker     the speaker encoder (clip -> global tokens)
    codec.model       the decode model: plain nn.Modules and their loading
    settings, errors, metrics, logs, text: leaf modules anyone may use

``client`` (the command-line client) talks to the gateway over HTTP only.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decoder_gateway"

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "decoder_gateway.settings": 0,
    "decoder_gateway.errors": 0,
    "decoder_gateway.metrics": 0,
    "decoder_gateway.logs": 0,
    "decoder_gateway.text": 0,
    "decoder_gateway.codec.model": 1,
    "decoder_gateway.codec.speaker": 2,
    "decoder_gateway.codec.runtime": 3,
    "decoder_gateway.codec": 3,  # the package's re-exports
    "decoder_gateway.audio": 4,
    "decoder_gateway.llm": 5,
    "decoder_gateway.voices": 5,
    "decoder_gateway.serving": 6,
    "decoder_gateway.api": 7,
    "decoder_gateway.client": 7,
    "decoder_gateway.integrations": 7,  # services for voice-agent frameworks, over WS only
    "decoder_gateway.app": 8,
    "decoder_gateway.__main__": 9,
    "decoder_gateway": 9,  # the package's own __init__
}
WEB_FRAMEWORKS = ("fastapi", "starlette", "sse_starlette")
MAY_IMPORT_WEB = ("decoder_gateway.api", "decoder_gateway.app")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module that module ``name`` (at ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import module`` imports the module itself.
            found.update(
                f"{target}.{alias.name}"
                for alias in node.names
                if f"{target}.{alias.name}" in modules
            )
    return found


def all_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> everything it imports, the standard library and third parties included."""
    modules = package_modules(package)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    return {
        name: {m for m in targets if m in graph_nodes and m != name}
        for graph_nodes in [set(package_modules(package))]
        for name, targets in all_imports(package).items()
    }


def layer_of(module: str) -> int | None:
    """The layer of the longest registered prefix of ``module``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if (layer_of(target) or 0) > (layer_of(name) or 0)
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle found by a depth-first walk, as ``a -> b -> a``.

    A package's ``__init__`` re-exporting its own submodules is not a loop of code, so
    edges from a package into itself are left out; every other edge counts.
    """
    edges = {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph.items()
    }
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_every_module_has_a_layer():
    unplaced = [name for name in package_modules() if layer_of(name) is None]
    assert unplaced == []


def test_the_package_root_holds_at_most_eight_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 8, loose


def test_imports_run_downwards_only():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle_type_only_imports_included():
    assert import_cycles(import_graph()) == []


def test_the_model_knows_nothing_of_its_runtime():
    offending = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith(("decoder_gateway.codec.model", "decoder_gateway.codec.speaker"))
        for target in targets
        if target.startswith("decoder_gateway.codec.runtime") or target == "decoder_gateway.codec"
    ]
    assert offending == []


def test_only_the_web_edge_imports_the_web_framework():
    offending = [
        f"{name} imports {target}"
        for name, targets in all_imports().items()
        if not name.startswith(MAY_IMPORT_WEB)
        for target in sorted(targets)
        if target.split(".")[0] in WEB_FRAMEWORKS
    ]
    assert offending == []


def test_the_package_never_imports_test_tooling():
    offending = [
        f"{name} imports {target}"
        for name, targets in all_imports().items()
        for target in sorted(targets)
        if target.split(".")[0] in {"devtools", "tests", "benchmarks", "pytest"}
    ]
    assert offending == []


def test_the_checks_catch_a_type_only_upward_import_and_a_cycle(tmp_path):
    """A fake package laid out like ours, whose model imports the runtime under
    TYPE_CHECKING and whose runtime imports the model back: both checks must see it."""
    fake = tmp_path / "decoder_gateway"
    for folder in (fake, fake / "codec", fake / "codec" / "model", fake / "codec" / "runtime"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (fake / "codec" / "model" / "bicodec.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..runtime.spans import Span\n"
    )
    (fake / "codec" / "runtime" / "spans.py").write_text(
        "def f():\n    from decoder_gateway.codec.model import bicodec\n"
    )
    graph = import_graph(fake)
    assert upward_imports(graph) == [
        "decoder_gateway.codec.model.bicodec (layer 1) imports "
        "decoder_gateway.codec.runtime.spans (layer 3)"
    ]
    assert import_cycles(graph) == [
        "decoder_gateway.codec.model.bicodec -> decoder_gateway.codec.runtime.spans"
        " -> decoder_gateway.codec.model.bicodec"
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the repository as committed (setuptools builds in place, so from a
    copy: neither build/ nor *.egg-info lands in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("decoder_gateway-*.whl")
    return built


def test_the_wheel_holds_the_service_and_no_test_tooling(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"decoder_gateway"}
    for needed in ("decoder_gateway/voices/voices.json", "decoder_gateway/api/static/index.html",
                   "decoder_gateway/codec/model/bicodec.py", "decoder_gateway/app.py"):  # fmt: skip
        assert needed in names
    assert not [n for n in names if "testing" in n.split("/") or n.startswith("devtools")]
