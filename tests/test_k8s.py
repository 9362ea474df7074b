"""deploy/k8s: every overlay rendered and checked offline, without a cluster.

- A small kustomize-equivalent renderer (below) builds each overlay: ``resources``
  (files and folders), ``patches`` (strategic merge, one object per file, with the
  merge keys kubectl uses for the fields the manifests patch) and ``images``. Any
  other kustomization field is an error, so that nothing is silently ignored. Where a
  ``kustomize`` or ``kubectl`` binary is installed, its output is compared with ours.
- Every object is validated against the Kubernetes JSON schemas (PyPI
  kubernetes-validate, strict: unknown fields fail) of the oldest and newest versions
  named below.
- Then what the schemas cannot know: the gateway's variables are settings of
  ``decoder_gateway.settings.Settings`` (and the ConfigMap is a valid one), vLLM's are
  variables of launch_vllm.sh (which accepts them), secrets only come from a Secret,
  the probes hit real routes of the app, GPUs are where they belong, the HPA's metric is
  one the gateway exports, the grace period covers the longest stream, and the pieces
  point at each other (Services, PVCs, LLM_BASE_URL, the served model name).
- Broken copies (a wrong probe path, a missing GPU limit, an unknown variable, a schema
  violation, ...) must fail those checks.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match

from decoder_gateway.app import create_app
from decoder_gateway.metrics import Metrics
from decoder_gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SECRET_EXAMPLE = K8S / "secret.example.yaml"
LAUNCHER = ROOT / "launch_vllm.sh"
# Schemas of kubernetes-validate: the oldest Kubernetes the manifests are meant for and
# the newest the package ships.
KUBERNETES_VERSIONS = ("1.29", "1.37")
SECRET_NAME = "spark-tts-secrets"
SECRET_KEYS = {"GATEWAY_API_KEY", "VLLM_API_KEY", "HF_TOKEN"}
SECRET_VARIABLE = re.compile(r"(^|_)(API_KEY|TOKEN|PASSWORD|SECRET)$")
# Speech runs at about 15 characters per second (settings.py: ~3.3 tokens per character
# at 50 tokens per second): the longest text's audio, which a client reading at playback
# speed takes as long to receive.
SPEECH_CHARS_PER_S = 15
# Gateway routes that call vLLM (a liveness probe must not).
NEEDS_VLLM = {"/health"}


# ----------------------------------------------------------------------------- renderer


class RenderError(ValueError):
    pass


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
# kubectl's patchMergeKey of the list fields the manifests patch; other lists replace.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def load_documents(path: Path) -> list[dict]:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise RenderError(f"{path}: not a Kubernetes object")
    return documents


def object_id(document: dict) -> tuple[str, str, str]:
    group = document.get("apiVersion", "").rpartition("/")[0]
    return group, document["kind"], document.get("metadata", {}).get("name", "")


def merge_key(field: str, items: list) -> str | None:
    if field == "ports":  # containers: containerPort, Services: port
        return "containerPort" if all("containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def strategic_merge(target, patch, field: str = ""):
    """A strategic merge patch: maps merge (null deletes a key), lists of maps merge by
    their merge key, other lists and scalars are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(target, list) and isinstance(patch, list):
        key = merge_key(field, target + patch)
        if key is None or not all(isinstance(i, dict) and key in i for i in target + patch):
            return copy.deepcopy(patch)
        merged = [copy.deepcopy(i) for i in target]
        for item in patch:
            index = next((n for n, old in enumerate(merged) if old[key] == item[key]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item, field)
        return merged
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str | None]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, None
    return name, tag


def set_images(document, images: list[dict]) -> None:
    """kustomize's images transformer on every container list of ``document``."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag = split_image(container.get("image", ""))
                    for image in images:
                        if image["name"] == name:
                            name, tag = image.get("newName", name), image.get("newTag", tag)
                            container["image"] = name if tag is None else f"{name}:{tag}"
            else:
                set_images(value, images)
    elif isinstance(document, list):
        for item in document:
            set_images(item, images)


def render(folder: Path) -> list[dict]:
    """What ``kustomize build folder`` prints, as a list of objects."""
    path = folder / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{folder}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    if kustomization.get("kind") != "Kustomization":
        raise RenderError(f"{path}: kind is not Kustomization")
    documents: list[dict] = []
    for entry in kustomization.get("resources", []):
        resource = (folder / entry).resolve()
        if resource.is_dir():
            documents += render(resource)
        elif resource.is_file():
            documents += load_documents(resource)
        else:
            raise RenderError(f"{path}: resource {entry} not found")
    ids = [object_id(d) for d in documents]
    if len(set(ids)) != len(ids):
        raise RenderError(f"{path}: an object is defined twice")
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise RenderError(f"{path}: patch entries take only a path: {entry}")
        patches = load_documents(folder / entry["path"])
        if len(patches) != 1:  # kustomize's `patches` takes one object per file
            raise RenderError(f"{entry['path']}: {len(patches)} objects in one patch file")
        (patch,) = patches
        matches = [n for n, d in enumerate(documents) if object_id(d) == object_id(patch)]
        if len(matches) != 1:
            raise RenderError(f"{entry['path']}: no object {object_id(patch)} to patch")
        documents[matches[0]] = strategic_merge(documents[matches[0]], patch)
    for document in documents:
        set_images(document, kustomization.get("images", []))
    return documents


# ----------------------------------------------------------------------------- access


def find(documents: list[dict], kind: str, name: str) -> dict:
    found = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(documents: list[dict], deployment: str) -> dict:
    return find(documents, "Deployment", deployment)["spec"]["template"]["spec"]


def container(documents: list[dict], deployment: str) -> dict:
    (only,) = pod_spec(documents, deployment)["containers"]
    return only


def environment(documents: list[dict], spec: dict) -> dict[str, dict]:
    """A container's variables -> where each comes from: {"value": ...},
    {"configMap": name, "value": ...} or {"secret": name, "key": key}."""
    env: dict[str, dict] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            for key, value in find(documents, "ConfigMap", name).get("data", {}).items():
                env[key] = {"configMap": name, "value": value}
        else:
            env[f"<envFrom {sorted(source)}>"] = {"unchecked": source}
    for entry in spec.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"].get("secretKeyRef")
            if ref is None:
                env[entry["name"]] = {"unchecked": entry["valueFrom"]}
            else:
                env[entry["name"]] = {"secret": ref["name"], "key": ref["key"]}
        else:
            env[entry["name"]] = {"value": entry.get("value", "")}
    return env


def gateway_values(documents: list[dict]) -> dict[str, str]:
    env = environment(documents, container(documents, "gateway"))
    return {name: source["value"] for name, source in env.items() if "value" in source}


def effective_settings(documents: list[dict]) -> Settings:
    """The settings the gateway starts with (those not set: the defaults)."""
    return Settings(**{k.lower(): v for k, v in gateway_values(documents).items()})


def launcher_variables() -> set[str]:
    """Every variable launch_vllm.sh reads (``${NAME:-...}`` or ``${NAME-...}``)."""
    text = LAUNCHER.read_text(encoding="utf-8")
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", text))


@functools.cache
def gateway_app() -> FastAPI:
    return create_app(Settings())


def routed(path: str) -> bool:
    """Whether the app (built, not started) has a route for ``GET path``."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(r.matches(scope)[0] == Match.FULL for r in gateway_app().router.routes)


def dockerfile_env(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text(encoding="utf-8")
    return dict(re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+?)\s*\\?$", text, re.M))


def compose_image(service: str) -> str:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    return compose["services"][service]["image"].split(":")[0]


# ----------------------------------------------------------------------------- checks


@functools.cache
def kubernetes_validate():
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.fail("kubernetes-validate not installed: pip install -e '.[test]'")
    # validate() reads the schema files (1.8 MB of definitions) at every call: once here.
    utils.schema_contents = functools.cache(utils.schema_contents)
    return utils


def schema_problems(documents: list[dict], versions=KUBERNETES_VERSIONS) -> list[str]:
    utils = kubernetes_validate()
    problems = []
    for document in documents:
        for version in versions:
            try:
                utils.validate(document, version, strict=True)
            except utils.ValidationError as err:
                where = "/".join(map(str, err.absolute_path))
                problems.append(f"{object_id(document)} ({version}) {where}: {err.message}")
            except utils.SchemaNotFoundError as err:
                problems.append(err.message)
    return problems


def env_problems(documents: list[dict]) -> list[str]:
    problems = []
    settings_names = {name.upper() for name in Settings.model_fields}
    allowed = {"gateway": settings_names, "vllm": launcher_variables() - {"VLLM_PORT"}}
    for deployment, names in allowed.items():
        for name, source in environment(documents, container(documents, deployment)).items():
            if name not in names:
                problems.append(f"{deployment}: {name} is not a variable it reads")
            if "unchecked" in source:
                problems.append(f"{deployment}: {name} comes from {source}, not checkable")
    try:
        effective_settings(documents)
    except ValueError as err:
        problems.append(f"gateway: the settings would not start: {err}")
    values = gateway_values(documents)
    vllm_values = {
        k: v["value"]
        for k, v in environment(documents, container(documents, "vllm")).items()
        if "value" in v
    }
    problems += launcher_problems(vllm_values)
    if values.get("MODEL_NAME") != vllm_values.get("SERVED_MODEL_NAME"):
        problems.append("gateway MODEL_NAME is not the SERVED_MODEL_NAME of vLLM")
    return problems


@functools.cache
def fake_python_folder() -> Path:
    """A folder with a ``python3`` that does nothing: launch_vllm.sh exec's it."""
    folder = Path(tempfile.mkdtemp(prefix="k8s-fake-python-"))
    atexit.register(shutil.rmtree, folder, True)
    fake = folder / "python3"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c pass\n')
    fake.chmod(0o755)
    return folder


def launcher_problems(env: dict[str, str]) -> list[str]:
    """launch_vllm.sh run on these variables, with a fake python3 (never vLLM)."""
    bin_dir = fake_python_folder()
    base = {k: v for k, v in os.environ.items() if k not in launcher_variables()}
    base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(LAUNCHER)], env={**base, **env}, capture_output=True, text=True, timeout=30
    )
    return [] if result.returncode == 0 else [f"vllm: launch_vllm.sh refuses: {result.stderr}"]


def secret_problems(documents: list[dict]) -> list[str]:
    problems = []
    for document in documents:
        if document["kind"] == "Secret":
            problems.append(f"Secret {document['metadata']['name']} in the manifests")
        if document["kind"] == "ConfigMap":
            for key in document.get("data", {}):
                if SECRET_VARIABLE.search(key):
                    problems.append(f"ConfigMap {document['metadata']['name']} holds {key}")
    for deployment in ("gateway", "vllm"):
        for name, source in environment(documents, container(documents, deployment)).items():
            if "secret" in source:
                if source["secret"] != SECRET_NAME or source["key"] not in SECRET_KEYS:
                    problems.append(f"{deployment}: {name} from an unknown secret key {source}")
            elif SECRET_VARIABLE.search(name):
                problems.append(f"{deployment}: {name} is not read from a Secret")
    return problems


def port_number(spec: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port), None)


def probe_problems(documents: list[dict]) -> list[str]:
    problems = []
    settings = effective_settings(documents)
    exempt = [p.strip() for p in settings.auth_exempt_paths.split(",") if p.strip()]
    gateway = container(documents, "gateway")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = gateway.get(kind, {}).get("httpGet")
        if probe is None:
            problems.append(f"gateway: no HTTP {kind}")
            continue
        if not routed(probe["path"]):
            problems.append(f"gateway {kind}: {probe['path']} is not a route of the app")
        if not any(probe["path"] == p or probe["path"].startswith(p + "/") for p in exempt):
            problems.append(f"gateway {kind}: {probe['path']} needs the API key")
        if port_number(gateway, probe["port"]) != settings.port:
            problems.append(f"gateway {kind}: port {probe['port']} is not PORT={settings.port}")
        if kind != "readinessProbe" and probe["path"] in NEEDS_VLLM:
            problems.append(f"gateway {kind}: {probe['path']} depends on vLLM")
    if gateway.get("readinessProbe", {}).get("httpGet", {}).get("path") not in NEEDS_VLLM:
        problems.append("gateway readinessProbe: not /health (ready means vLLM answers)")
    vllm = container(documents, "vllm")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = vllm.get(kind, {}).get("httpGet")
        if probe is None or probe["path"] != "/health" or port_number(vllm, probe["port"]) != 8000:
            problems.append(f"vllm {kind}: not GET /health on 8000: {probe}")
    startup = vllm.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 600:
        problems.append("vllm startupProbe: under 10 min for a first download")
    return problems


def gpus(spec: dict) -> object:
    resources = spec.get("resources", {})
    return resources.get("limits", {}).get("nvidia.com/gpu") or resources.get("requests", {}).get(
        "nvidia.com/gpu"
    )


def cores(quantity) -> float:
    """A CPU quantity ("4", 4, "500m") in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def resource_problems(documents: list[dict]) -> list[str]:
    problems = []
    if str(gpus(container(documents, "vllm"))) != "1":
        problems.append("vllm: not one nvidia.com/gpu per replica")
    gateway = container(documents, "gateway")
    settings = effective_settings(documents)
    requests = gateway.get("resources", {}).get("requests", {})
    if "cpu" not in requests or "memory" not in requests:
        problems.append("gateway: no cpu and memory requests")
    if settings.decoder_device == "cpu":
        if gpus(gateway) is not None:
            problems.append("gateway: decodes on the CPU but holds a GPU")
        if settings.decoder_threads is None or settings.decoder_threads > max(
            cores(requests.get("cpu", "0")), 1
        ):
            problems.append("gateway: DECODER_THREADS unset or over the CPU request")
    elif str(gpus(gateway)) != "1":
        problems.append(f"gateway: DECODER_DEVICE={settings.decoder_device} without a GPU")
    return problems


def hpa_problems(documents: list[dict]) -> list[str]:
    problems = []
    hpa = find(documents, "HorizontalPodAutoscaler", "gateway")["spec"]
    target = hpa["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", "gateway"):
        problems.append(f"HPA scales {target}")
    exported = {family.name: family.type for family in Metrics().registry.collect()}
    settings = effective_settings(documents)
    for metric in hpa.get("metrics", []):
        if metric["type"] != "Pods":
            problems.append(f"HPA metric of type {metric['type']}")
            continue
        name = metric["pods"]["metric"]["name"]
        if exported.get(name) != "gauge":
            problems.append(f"HPA metric {name} is not a gauge the gateway exports")
        value = float(metric["pods"]["target"].get("averageValue", "inf"))
        if not 0 < value < settings.max_concurrent_streams:
            problems.append(f"HPA target {value} not under MAX_CONCURRENT_STREAMS")
    if "replicas" in find(documents, "Deployment", "gateway")["spec"]:
        problems.append("gateway Deployment sets replicas: the HPA owns them")
    pdb = find(documents, "PodDisruptionBudget", "gateway")["spec"]
    if hpa.get("minReplicas", 1) <= pdb.get("minAvailable", 0):
        problems.append("HPA minReplicas leaves the PDB no pod to evict")
    return problems


def pre_stop_seconds(spec: dict) -> float | None:
    command = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    return None


def shutdown_problems(documents: list[dict]) -> list[str]:
    problems = []
    settings = effective_settings(documents)
    spec = pod_spec(documents, "gateway")
    pre_stop = pre_stop_seconds(container(documents, "gateway"))
    if pre_stop is None:
        problems.append("gateway: no preStop sleep")
        pre_stop = 0.0
    period = spec.get("terminationGracePeriodSeconds", 30)
    if period < settings.shutdown_grace_s + pre_stop:
        problems.append(
            f"gateway terminationGracePeriodSeconds={period} is under "
            f"SHUTDOWN_GRACE_S={settings.shutdown_grace_s:g} + preStop {pre_stop:g}"
        )
    longest = settings.max_text_chars / SPEECH_CHARS_PER_S
    if settings.shutdown_grace_s < longest:
        problems.append(f"SHUTDOWN_GRACE_S is under the longest stream ({longest:.0f} s)")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def wiring_problems(documents: list[dict]) -> list[str]:
    problems = []
    for name in ("vllm", "gateway"):
        deployment = find(documents, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"Deployment {name}: its selector misses its pods")
        service = find(documents, "Service", name)["spec"]
        if not selects(service["selector"], labels):
            problems.append(f"Service {name}: selects no pod of {name}")
        for port in service["ports"]:
            if port_number(container(documents, name), port["targetPort"]) is None:
                problems.append(f"Service {name}: targetPort {port['targetPort']} unknown")
    gateway_pods = find(documents, "Deployment", "gateway")["spec"]["template"]["metadata"]
    pdb = find(documents, "PodDisruptionBudget", "gateway")["spec"]["selector"]["matchLabels"]
    if not selects(pdb, gateway_pods["labels"]):
        problems.append("PodDisruptionBudget: selects no gateway pod")
    settings = effective_settings(documents)
    url = urlsplit(settings.llm_base_url)
    vllm_ports = [p["port"] for p in find(documents, "Service", "vllm")["spec"]["ports"]]
    if url.hostname != "vllm" or url.port not in vllm_ports or url.path != "/v1":
        problems.append(f"LLM_BASE_URL {settings.llm_base_url} is not the vllm Service's /v1")
    claims = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolumeClaim"}
    homes = {
        "vllm": dockerfile_env("Dockerfile.vllm")["HF_HOME"],
        "gateway": dockerfile_env("Dockerfile.gateway")["HF_HOME"],
    }
    mounts_of = {}
    for name in ("vllm", "gateway"):
        volumes = {v["name"]: v for v in pod_spec(documents, name).get("volumes", [])}
        mounts = {}
        for mount in container(documents, name).get("volumeMounts", []):
            claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim", {})
            if claim and claim["claimName"] not in claims:
                problems.append(f"{name}: no PersistentVolumeClaim {claim['claimName']}")
            mounts[mount["mountPath"]] = claim.get("claimName")
        mounts_of[name] = mounts
        if mounts.get(homes[name]) != "hf-cache":
            problems.append(f"{name}: the hf-cache claim is not mounted at HF_HOME")
    if mounts_of["gateway"].get(str(settings.library_folder())) != "voice-library":
        problems.append("gateway: VOICE_LIBRARY_DIR is not on the voice-library claim")
    if not str(settings.tokenizer_cache_dir).startswith(homes["gateway"] + "/"):
        problems.append("gateway: TOKENIZER_CACHE_DIR is not in the shared cache")
    for name in ("hf-cache", "voice-library"):
        if "ReadWriteMany" not in claims.get(name, {}).get("spec", {}).get("accessModes", []):
            problems.append(f"PersistentVolumeClaim {name} is not ReadWriteMany")
    for name in ("vllm", "gateway"):
        if {"command", "args"} & set(container(documents, name)):
            problems.append(f"{name}: overrides the image's entry point")
    return problems


CHECKS: dict[str, Callable[[list[dict]], list[str]]] = {
    "schema": schema_problems,
    "env": env_problems,
    "secrets": secret_problems,
    "probes": probe_problems,
    "resources": resource_problems,
    "hpa": hpa_problems,
    "shutdown": shutdown_problems,
    "wiring": wiring_problems,
}


def all_problems(documents: list[dict]) -> list[str]:
    problems = []
    for check in CHECKS.values():
        try:
            problems += check(documents)
        except (KeyError, AssertionError, TypeError, ValueError) as err:
            problems.append(f"{check.__name__}: {type(err).__name__} {err}")
    return problems


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def test_the_overlays_are_there():
    assert {"gpu", "cpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
@pytest.mark.parametrize("check", list(CHECKS))
def test_overlay_passes_check(overlay, check):
    folder = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    documents = render(folder)
    assert CHECKS[check](documents) == []


def test_overlays_differ_only_where_meant(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    assert effective_settings(gpu).decoder_device == "cuda"
    assert effective_settings(cpu).decoder_device == "cpu"
    assert gpus(container(cpu, "gateway")) is None
    assert gpus(container(cpu, "vllm")) == 1  # vLLM keeps its GPUs
    assert container(gpu, "vllm") == container(cpu, "vllm")
    kinds = sorted(object_id(d) for d in gpu)
    assert kinds == sorted(object_id(d) for d in cpu)
    assert {d["kind"] for d in gpu} == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "PersistentVolumeClaim",
    }  # fmt: skip


def test_base_images_are_the_compose_images_and_overlays_name_a_registry(rendered):
    base = render(K8S / "base")
    assert container(base, "vllm")["image"] == compose_image("vllm")
    assert container(base, "gateway")["image"] == compose_image("gateway")
    for documents in rendered.values():
        for name in ("vllm", "gateway"):
            repository, tag = split_image(container(documents, name)["image"])
            assert "/" in repository and tag and tag != "latest", (name, repository, tag)


def test_secret_example_is_valid_and_not_part_of_any_overlay(rendered):
    example = load_documents(SECRET_EXAMPLE)
    assert schema_problems(example) == []
    (secret,) = example
    assert secret["metadata"]["name"] == SECRET_NAME
    referenced = set()
    for documents in rendered.values():
        for name in ("vllm", "gateway"):
            env = environment(documents, container(documents, name))
            referenced |= {s["key"] for s in env.values() if "secret" in s}
    assert referenced == SECRET_KEYS
    text = SECRET_EXAMPLE.read_text()
    assert all(f"{key}:" in text for key in SECRET_KEYS)  # documented (HF_TOKEN commented out)
    assert "secret.yaml" in (K8S / ".gitignore").read_text().split()


def test_gateway_grace_period_fits_the_longest_stream(rendered):
    """The numbers docs/kubernetes.md explains: 5000 characters, 360 s, 10 + 360 + 20."""
    settings = effective_settings(rendered["gpu"])
    assert settings.max_text_chars == Settings().max_text_chars == 5000
    assert settings.shutdown_grace_s == 360
    assert pre_stop_seconds(container(rendered["gpu"], "gateway")) == 10
    assert pod_spec(rendered["gpu"], "gateway")["terminationGracePeriodSeconds"] == 390


# -- broken copies must fail ---------------------------------------------------------


def _gateway(d):
    return container(d, "gateway")


def _vllm(d):
    return container(d, "vllm")


def _config(d, name="gateway-config"):
    return find(d, "ConfigMap", name)["data"]


def _hpa_metric(d):
    return find(d, "HorizontalPodAutoscaler", "gateway")["spec"]["metrics"][0]["pods"]


BROKEN: dict[str, tuple[Callable[[list[dict]], object], str]] = {
    "probe path": (
        lambda d: _gateway(d)["livenessProbe"]["httpGet"].update(path="/healthz"),
        "/healthz is not a route",
    ),
    "liveness on vLLM": (
        lambda d: _gateway(d)["livenessProbe"]["httpGet"].update(path="/health"),
        "depends on vLLM",
    ),
    "probe port": (
        lambda d: _gateway(d)["readinessProbe"]["httpGet"].update(port=8000),
        "is not PORT=8001",
    ),
    "probe needs the key": (
        lambda d: _config(d).update(AUTH_EXEMPT_PATHS="/metrics"),
        "needs the API key",
    ),
    "vllm probe": (
        lambda d: _vllm(d)["readinessProbe"]["httpGet"].update(path="/v1/models"),
        "vllm readinessProbe",
    ),
    "short vllm startup": (
        lambda d: _vllm(d)["startupProbe"].update(failureThreshold=10),
        "first download",
    ),
    "vllm without GPU": (
        lambda d: _vllm(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "vllm: not one nvidia.com/gpu",
    ),
    "gateway GPU on CPU": (
        lambda d: _config(d).update(DECODER_DEVICE="cpu", DECODER_THREADS="2"),
        "holds a GPU",
    ),
    "unknown gateway variable": (
        lambda d: _config(d).update(DECODER_DEVICES="cuda"),
        "DECODER_DEVICES is not a variable",
    ),
    "invalid gateway value": (
        lambda d: _config(d).update(DECODER_DEVICE="tpu"),
        "would not start",
    ),
    "contradicting settings": (
        lambda d: _config(d).update(MAX_TEXT_CHARS="100"),
        "would not start",
    ),
    "unknown vllm variable": (
        lambda d: _config(d, "vllm-config").update(VLLM_PORT="9000"),
        "VLLM_PORT is not a variable",
    ),
    "invalid vllm value": (
        lambda d: _config(d, "vllm-config").update(GPU_MEMORY_UTILIZATION="90%"),
        "launch_vllm.sh refuses",
    ),
    "served model name": (
        lambda d: _config(d, "vllm-config").update(SERVED_MODEL_NAME="tts"),
        "SERVED_MODEL_NAME",
    ),
    "secret in ConfigMap": (
        lambda d: _config(d).update(GATEWAY_API_KEY="s3cret"),
        "holds GATEWAY_API_KEY",
    ),
    "secret as a literal": (
        lambda d: _gateway(d)["env"].append({"name": "LLM_API_KEY", "value": "s3cret"}),
        "LLM_API_KEY is not read from a Secret",
    ),
    "secret object": (
        lambda d: d.append(load_documents(SECRET_EXAMPLE)[0]),
        "Secret spark-tts-secrets in the manifests",
    ),
    "schema: unknown field": (
        lambda d: _gateway(d).update(readinessProbes=_gateway(d).pop("readinessProbe")),
        "readinessProbes",
    ),
    "schema: wrong type": (
        lambda d: find(d, "Deployment", "vllm")["spec"].update(replicas="two"),
        "'two' is not of type",
    ),
    "HPA metric": (
        lambda d: _hpa_metric(d)["metric"].update(name="tts_active_stream"),
        "tts_active_stream is not a gauge",
    ),
    "HPA counter": (
        lambda d: _hpa_metric(d)["metric"].update(name="tts_requests"),
        "tts_requests is not a gauge",
    ),
    "HPA target": (
        lambda d: _hpa_metric(d)["target"].update(averageValue="64"),
        "not under MAX_CONCURRENT_STREAMS",
    ),
    "grace period": (
        lambda d: pod_spec(d, "gateway").update(terminationGracePeriodSeconds=365),
        "terminationGracePeriodSeconds=365",
    ),
    "short grace setting": (
        lambda d: _config(d).update(SHUTDOWN_GRACE_S="60"),
        "under the longest stream",
    ),
    "no preStop": (lambda d: _gateway(d).pop("lifecycle"), "no preStop"),
    "LLM_BASE_URL": (
        lambda d: _config(d).update(LLM_BASE_URL="http://vllm-0:8000/v1"),
        "is not the vllm Service",
    ),
    "service selector": (
        lambda d: find(d, "Service", "vllm")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "gateway"}
        ),
        "Service vllm: selects no pod",
    ),
    "PDB selector": (
        lambda d: find(d, "PodDisruptionBudget", "gateway")["spec"]["selector"].update(
            matchLabels={"app": "gateway"}
        ),
        "PodDisruptionBudget: selects no gateway pod",
    ),
    "library not RWX": (
        lambda d: find(d, "PersistentVolumeClaim", "voice-library")["spec"].update(
            accessModes=["ReadWriteOnce"]
        ),
        "voice-library is not ReadWriteMany",
    ),
    "library path": (
        lambda d: _config(d).update(VOICE_LIBRARY_DIR="/data/voices"),
        "VOICE_LIBRARY_DIR is not on the voice-library claim",
    ),
    "replicas with HPA": (
        lambda d: find(d, "Deployment", "gateway")["spec"].update(replicas=2),
        "the HPA owns them",
    ),
    "entry point": (
        lambda d: _vllm(d).update(command=["vllm", "serve"]),
        "overrides the image's entry point",
    ),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_a_broken_copy_fails(rendered, breakage):
    mutate, expected = BROKEN[breakage]
    broken = copy.deepcopy(rendered["gpu"])
    mutate(broken)
    assert broken != rendered["gpu"]
    problems = all_problems(broken)
    assert any(expected in p for p in problems), problems


def test_a_broken_copy_on_disk_fails(tmp_path):
    """Through the renderer: a probe path edited in the base shows in an overlay."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    gateway = copy_root / "base" / "gateway.yaml"
    text = gateway.read_text()
    assert text.count("path: /livez") == 2
    gateway.write_text(text.replace("path: /livez", "path: /livenes", 1))
    problems = probe_problems(render(copy_root / "overlays" / "cpu"))
    assert problems == [
        "gateway startupProbe: /livenes is not a route of the app",
        "gateway startupProbe: /livenes needs the API key",
    ]


# -- the renderer itself ---------------------------------------------------------------


def test_strategic_merge():
    target = {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["-v"]},
                {"name": "b", "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}}},
            ]
        }
    }
    patch = {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["-q"]},
                {"name": "b", "resources": {"limits": {"nvidia.com/gpu": None}}},
            ]
        }
    }
    assert strategic_merge(target, patch) == {
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                    "args": ["-q"],  # no merge key: replaced
                },
                {"name": "b", "resources": {"limits": {"cpu": "1"}}},
            ]
        }
    }
    assert target["spec"]["containers"][1]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_images_transformer():
    document = {"spec": {"containers": [{"image": "app"}, {"image": "other:1"}]}}
    set_images(document, [{"name": "app", "newName": "r.io/x/app", "newTag": "2"}])
    assert document == {"spec": {"containers": [{"image": "r.io/x/app:2"}, {"image": "other:1"}]}}
    assert split_image("host:5000/app") == ("host:5000/app", None)


def _kustomization(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + text
    )
    return folder


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(RenderError, match="namePrefix"):
        render(_kustomization(tmp_path / "a", "namePrefix: x-\n"))
    with pytest.raises(RenderError, match="not found"):
        render(_kustomization(tmp_path / "b", "resources: [missing.yaml]\n"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "patch.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"
    )
    with pytest.raises(RenderError, match="to patch"):
        render(_kustomization(tmp_path / "c", "patches:\n  - path: patch.yaml\n"))
    (tmp_path / "c" / "patch.yaml").write_text("kind: A\n---\nkind: B\n")
    with pytest.raises(RenderError, match="2 objects in one patch file"):
        render(_kustomization(tmp_path / "c", "patches:\n  - path: patch.yaml\n"))


def test_matches_kustomize_where_installed(rendered):
    """The real kustomize, where one is installed (CI has none: PyPI ships no binary)."""
    for tool in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(tool[0]):
            break
    else:
        pytest.skip("no kustomize or kubectl binary")
    for name, documents in rendered.items():
        result = subprocess.run(
            [*tool, str(K8S / "overlays" / name)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
        key = lambda d: object_id(d)  # noqa: E731
        assert sorted(theirs, key=key) == sorted(documents, key=key)
