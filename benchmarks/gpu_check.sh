#!/usr/bin/env bash
# GPU check: the decoder tables and the gateway table on a lent GPU machine, in under
# 8 minutes (every part has a time budget; the parts' budgets add up to 400 s).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (DEVICE=cuda)
#   bash benchmarks/gpu_check.sh --dry-run  # here, on a CPU: the same steps, tiny sizes
#
# Before it meets a GPU: `bash benchmarks/gpu_wheels.sh` here, then call the device
# tool with carry=['.wheels'] (that machine has no network; README: "GPU check").
#
# 1. Python and torch: python3 there (PYTHON overrides; here .venv/bin/python). torch is
#    never carried: without it the check stops. DEVICE=cuda needs a CUDA device.
# 2. The gateway's other dependencies: missing ones are installed from .wheels/ with
#    `pip install --no-index` (the wheels must be for this machine's Python version);
#    PyAV, too big to carry, is replaced by a stub the PCM benchmarks never call.
# 3. bench_decoder.py --device $DEVICE: every section it has but `load`, most needed
#    first (full decode, CUDA graphs on/off, float32 against bf16/fp16 with SNR,
#    batch 1/4/16/64, streaming overhead, first chunk, streamed-vs-full SNR): 200 s.
# 4. bench_gateway.py --only grid: the full-size random decoder on $DEVICE behind the
#    gateway, the stand-in LLM at 200 and 400 tokens/s per stream, 1/4/16/64 streams:
#    200 s (its own --time-budget 180 s, so its table is always printed).
#
# The tables go to stdout and, when $OUT is set, to $OUT/gpu_tables.md (everything,
# pip and warnings included, to $OUT/gpu_check.log). Exit status: 0 when every part
# ran to its end, else the number of parts that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ "$dry_run" = 1 ]; then device=${DEVICE:-cpu}; else device=${DEVICE:-cuda}; fi
total_budget_s=${GPU_CHECK_BUDGET_S:-460}
wheels=${GPU_WHEELS:-.wheels}  # GPU_WHEELS: another folder (tests)

tables=""
log_pid=""
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tables=$OUT/gpu_tables.md
  : >"$tables"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  log_pid=$!
fi
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
# shellcheck disable=SC2329  # invoked by the EXIT trap below
finish() {  # remove the scratch folder; let the log's tee write its last lines
  rm -rf "$work"
  if [ -n "$log_pid" ]; then
    exec >&- 2>&-
    wait "$log_pid" 2>/dev/null
  fi
}
trap finish EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi

failures=0
record() {  # stdout, and the tables file when there is one
  if [ -n "$tables" ]; then tee -a "$tables"; else cat; fi
}
left_s() {
  echo $((total_budget_s - SECONDS))
}
part() {  # part NAME BUDGET_S COMMAND...: run under min(budget, time left), tables recorded
  local name=$1 budget=$2 rc started=$SECONDS
  shift 2
  if [ "$(left_s)" -lt "$budget" ]; then budget=$(left_s); fi
  if [ "$budget" -le 5 ]; then
    echo "== $name: skipped, the ${total_budget_s} s budget is spent" | record
    failures=$((failures + 1))
    return
  fi
  echo "== $name (budget ${budget} s)" >&2
  timeout --kill-after=10 "$budget" "$@" | record
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "(** $name: stopped at its ${budget} s budget; tables above are what it finished **)" \
      | record
    failures=$((failures + 1))
  elif [ "$rc" != 0 ]; then
    echo "(** $name: failed with exit status $rc; see the log **)" | record
    failures=$((failures + 1))
  fi
  echo "== $name: $((SECONDS - started)) s (exit $rc; $SECONDS s so far)" >&2
}

# ---- 1. Python and torch -------------------------------------------------------------
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "gpu_check.sh: torch is not installed for $py ($("$py" -V 2>&1)). This check does" \
    "not carry torch (far over the 64 MiB carry limit): stopping." >&2
  exit 3
fi
header=$("$py" - "$device" <<'EOF'
import platform
import sys

import torch

device = sys.argv[1]
line = (
    f"Python {platform.python_version()} ({sys.executable}), torch {torch.__version__}"
    f" (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads"
)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    line += f"; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    line += f", {props.multi_processor_count} SMs"
elif device == "cuda":
    print(line + "; torch sees no CUDA device", file=sys.stderr)
    sys.exit(4)
print(line)
EOF
) || { echo "gpu_check.sh: DEVICE=$device, but torch has no CUDA device: stopping." >&2; exit 4; }
mode="device $device"
if [ "$dry_run" = 1 ]; then mode="$mode, dry run (tiny sizes)"; fi
{
  echo "# GPU check ($mode), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$header"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
      --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
  fi
  echo "Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
} | record

# ---- 2. The gateway's dependencies ---------------------------------------------------
missing_modules() {
  "$py" - <<'EOF'
import importlib.util

modules = [
    "numpy", "safetensors", "omegaconf", "huggingface_hub", "fastapi", "uvicorn",
    "httptools", "websockets", "watchfiles", "dotenv", "openai", "httpx", "pydantic",
    "pydantic_settings", "soxr", "prometheus_client", "sse_starlette", "python_multipart",
    "av",
]
print(" ".join(m for m in modules if importlib.util.find_spec(m) is None))
EOF
}
install_wheels() {
  local want have
  if [ ! -f "$wheels/PYTHON_VERSION" ] || [ ! -f "$wheels/requirements.txt" ]; then
    echo "gpu_check.sh: missing here: $1; no $wheels/ was carried. Run" \
      "'bash benchmarks/gpu_wheels.sh' on the dev machine and carry $wheels." >&2
    return 5
  fi
  want=$(cat "$wheels/PYTHON_VERSION")
  have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$want" != "$have" ]; then
    echo "gpu_check.sh: $wheels/ holds wheels for Python $want, but $py is Python $have." \
      "Run 'bash benchmarks/gpu_wheels.sh --python $have' and carry $wheels again." >&2
    return 6
  fi
  echo "Installing from $wheels/ (no index): $1" >&2
  if timeout 120 "$py" -m pip install --quiet --disable-pip-version-check --no-index \
    --no-compile --find-links "$wheels" -r "$wheels/requirements.txt"; then
    return 0
  fi
  # An environment pip cannot change, or one whose packages conflict: beside it instead.
  echo "pip could not install into $py's environment; installing beside it" >&2
  timeout 120 "$py" -m pip install --quiet --disable-pip-version-check --no-index \
    --no-compile --no-deps --target "$work/site" "$wheels"/*.whl || return 7
  export PYTHONPATH="$PYTHONPATH:$work/site"
}
missing=$(missing_modules)
if [ -n "${missing// /}" ] && [ "$missing" != av ]; then
  install_wheels "$missing" || exit $?
  missing=$(missing_modules)
fi
if [ "$missing" = av ]; then
  # PyAV (35 MB) does not fit the carry limit. It serves mp3/opus/aac/flac, speed and
  # clip decoding, none of which the PCM stream endpoint of these benchmarks uses.
  mkdir -p "$work/stubs/av"
  cat >"$work/stubs/av/__init__.py" <<'EOF'
"""Stand-in for PyAV (gpu_check.sh): importable, fails when used."""


class _Missing:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed on this machine (gpu_check.sh stub)")


def __getattr__(name):
    return _Missing()
EOF
  cp "$work/stubs/av/__init__.py" "$work/stubs/av/filter.py"
  export PYTHONPATH="$PYTHONPATH:$work/stubs"
  echo "(PyAV is not installed: a stub stands in; only PCM output is benchmarked)" | record
  missing=""
fi
if [ -n "${missing// /}" ]; then
  echo "gpu_check.sh: still missing after the install: $missing: stopping." >&2
  exit 8
fi
echo "== dependencies ready after $SECONDS s" >&2

# ---- 3. Decoder tables ---------------------------------------------------------------
sections=$("$py" - <<'EOF'
import sys

sys.path.insert(0, "benchmarks")
try:
    import bench_decoder

    names = list(bench_decoder.SECTIONS)
except Exception:  # the script changed shape: ask for the sections it had
    names = ["speed", "streaming", "batch", "quality", "precision"]
print(",".join(n for n in names if n != "load"))
EOF
)
if [ "$dry_run" = 1 ]; then
  chosen=""  # the cheap ones on a CPU: full decode and (skipped there) reduced precision
  for name in speed graphs precision; do
    case ",$sections," in *",$name,"*) chosen=${chosen:+$chosen,}$name ;; esac
  done
  sections=$chosen
  decoder_args=(--quick)
else
  decoder_args=()
fi
case ",$sections," in
  *graph*) ;;
  *) echo "(bench_decoder.py has no CUDA-graph section: CUDA graphs on/off not measured)" \
    | record ;;
esac
part "decoder tables (bench_decoder.py: $sections)" 200 \
  "$py" benchmarks/bench_decoder.py --device "$device" "${decoder_args[@]}" --only "$sections"

# ---- 4. Gateway table ----------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  grid_args=(--rates 400 --streams 1 --requests-per-stream 1 --cell-timeout 60)
else
  grid_args=(--rates "200,400" --streams "1,4,16,64" --requests-per-stream 2 --cell-timeout 30)
fi
part "gateway table (bench_gateway.py --only grid)" 200 \
  "$py" benchmarks/bench_gateway.py --only grid --decoders full --device "$device" \
  --full-max-streams 0 --full-dir "$work/bicodec-full" --time-budget 180 "${grid_args[@]}"

echo "== done in $SECONDS s; $failures part(s) failed or ran out of time${tables:+; tables: $tables}" \
  >&2
exit "$failures"
