#!/usr/bin/env bash
# The project's one test command, on a fresh machine or an old checkout alike:
#   bash scripts/test.sh [pytest args]
# It sets up both virtual environments (idempotent): the gateway's in .venv/, and
# the vLLM CPU build in .venv-vllm/ (the tests start the real vLLM OpenAI server
# from it, through launch_vllm.sh), and Debian's Chromium for the web page test,
# then runs ruff and the whole pytest suite, and then scripts/compose_check.sh: both
# images built and the stack run with `docker compose` (it prints its reason and is
# skipped where it cannot run; COMPOSE_CHECK=0 skips it, and so do pytest arguments
# unless COMPOSE_CHECK=1).
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) avoids PyPI's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_index=(--extra-index-url "$TORCH_INDEX_URL")
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so that our package's "torch>=2.4" is already satisfied.
.venv/bin/python -m pip install -q "${torch_index[@]}" "torch==2.13.0"
# The gateway with its test extra and the pipecat service's (tests/test_pipecat.py), and
# the test tooling (devtools/: stand-in LLM, tiny models, process runners), a
# distribution of its own so that the wheel never holds it.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,pipecat]" -e ./devtools

bash scripts/setup_vllm_env.sh .venv-vllm

# Headless Chromium for tests/test_web.py: Playwright drives the system browser
# (`playwright install` downloads its own and is never run).
if [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/test_web.py needs Debian's chromium: sudo apt-get install chromium" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if ! command -v ffmpeg >/dev/null && [[ $(id -u) -eq 0 ]]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; fi # README's curl | ffmpeg example (tests/test_readme.py)

echo "== ruff" >&2
.venv/bin/ruff check --no-cache .
.venv/bin/ruff format --no-cache --check .

echo "== pytest" >&2
.venv/bin/python -m pytest "$@"

if [[ "${COMPOSE_CHECK:-}" == 0 ]] || { (($# > 0)) && [[ "${COMPOSE_CHECK:-}" != 1 ]]; }; then
    echo "== compose check: skipped (COMPOSE_CHECK=0, or pytest arguments given)" >&2
else
    echo "== compose check (scripts/compose_check.sh)" >&2
    status=0
    bash scripts/compose_check.sh || status=$?
    if ((status == 77)); then
        echo "== compose check: skipped, for the reason printed above" >&2
    elif ((status != 0)); then
        exit "$status"
    fi
fi
