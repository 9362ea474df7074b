#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on the lent GPU
# machine, which has no network: the gateway's runtime dependencies (pyproject.toml,
# versions from constraints.txt) for Linux x86-64 and one CPython version, less what
# that machine's image already holds and what is too big to carry:
#
#   bash benchmarks/gpu_wheels.sh [--python 3.12] [--dest .wheels]
#
# - torch is never carried (gigabytes; the image has its own CUDA build).
# - av (PyAV, a ~35 MB wheel) does not fit beside the ~43 MB working tree under the
#   device tool's 64 MiB carry limit; gpu_check.sh puts a stub in its place (the PCM
#   stream endpoint that the benchmarks use never calls it).
# - numpy, safetensors, huggingface_hub, hf-xet, PyYAML and uvloop are in the image
#   (/work/.library/device/KINDS.md) and large: left out too.
#
# The image's python3 is 3.12 (KINDS.md: Python 3.12.3 at /opt/torch/.venv); the
# folder records the version it was made for, and gpu_check.sh stops with a clear
# message if the machine's Python differs. The folder (.wheels/ by default) is
# ignored by git; name it in the device tool's `carry`.
set -euo pipefail

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
}

cd "$(dirname "$0")/.."
py_version=3.12
dest=.wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py_version=${2:?--python needs a version such as 3.12}; shift 2 ;;
    --dest) dest=${2:?--dest needs a folder}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$py_version" in
  3.[0-9] | 3.[0-9][0-9]) ;;
  *) echo "gpu_wheels.sh: --python wants MAJOR.MINOR, e.g. 3.12, not $py_version" >&2; exit 2 ;;
esac

if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
# Not carried: torch (its own CUDA build there), av (too big), and the image's own.
left_out="torch av numpy safetensors huggingface-hub hf-xet pyyaml uvloop"

# The runtime requirements of pyproject.toml, less torch and av.
requirements=$("$python" - "$left_out" <<'EOF'
import re
import sys
import tomllib

skip = set(sys.argv[1].split())
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    name = re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0]
    if name.lower().replace("_", "-") not in {"torch", "av"}:
        print(dep)
EOF
)

rm -rf "$dest"
mkdir -p "$dest"
echo "Downloading wheels for CPython $py_version, manylinux x86-64, into $dest/ ..."
# shellcheck disable=SC2086  # the requirements are one per word on purpose
"$python" -m pip download --quiet --disable-pip-version-check \
  --only-binary=:all: --implementation cp --python-version "$py_version" \
  --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -c constraints.txt -d "$dest" $requirements

# Drop what the image has (or what is too big); pip on the machine finds those installed.
for name in $left_out; do
  pattern=$(echo "$name" | tr '-' '_')
  find "$dest" -maxdepth 1 -iname "${pattern}-[0-9]*.whl" -delete
done
echo "$requirements" >"$dest/requirements.txt"
echo "$py_version" >"$dest/PYTHON_VERSION"

# The device tool carries at most 64 MiB: the working tree (tracked and untracked,
# not ignored files) plus the carried folders.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
  | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
wheel_bytes=$(du -cb "$dest" | tail -n 1 | cut -f 1)
total=$((tree_bytes + wheel_bytes))
limit=$((64 * 1024 * 1024))
ls -1 "$dest"
echo "wheels: $((wheel_bytes / 1024)) KiB in $(find "$dest" -name '*.whl' | wc -l) files;" \
  "working tree: $((tree_bytes / 1024)) KiB; together $((total / 1024)) KiB" \
  "of the $((limit / 1024)) KiB carry limit."
if [ "$total" -gt "$limit" ]; then
  echo "gpu_wheels.sh: over the device tool's 64 MiB limit: carry less." >&2
  exit 1
fi
echo "Carry it: run(command='bash benchmarks/gpu_check.sh', carry=['$dest'])"
