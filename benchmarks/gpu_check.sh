#!/usr/bin/env bash
# The GPU check in one command, from a bare GPU machine (benchmarks/gpu_check.py says what it measures).
#
#   bash benchmarks/gpu_check.sh prepare [DIR]     here, with network: download the wheels the GPU
#                                                  machine lacks into DIR (default .whl, git-ignored)
#   bash benchmarks/gpu_check.sh OUT [OPTIONS]     there: install those wheels, then
#                                                  python -m benchmarks.gpu_check OUT [OPTIONS]
#
# The wheels are the versions installed in this checkout's .venv of the packages the GPU image does
# not hold (monai, yacs, nibabel, pydicom) and timm (the image's may be older than requirements.txt
# asks); all are pure Python, about 12 MB. With the device tool:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Environment: PYTHON (default python3; prepare: .venv/bin/python), GPU_CHECK_WHEELS (default .whl),
# GPU_CHECK_SITE (where the wheels are installed, default /tmp/gpu_check_site).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="monai yacs nibabel pydicom timm"

if [ "${1:-}" = "prepare" ]; then
    dir="${2:-.whl}"
    py="${PYTHON:-.venv/bin/python}"
    mkdir -p "$dir"
    for name in $PACKAGES; do
        version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
            echo "gpu_check.sh prepare: $name is not installed in $py; install requirements.txt first" >&2; exit 2; }
        rm -f "$dir"/"$name"-*.whl  # one version of each: two would stop the install there
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$dir" "$name==$version"
    done
    if [ "$dir" = ".whl" ]; then  # keep the wheels out of git (the device tool still carries them)
        exclude="$(git rev-parse --git-dir)/info/exclude"
        mkdir -p "$(dirname "$exclude")"
        grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
    fi
    ls -l "$dir"
    exit 0
fi

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT [gpu_check.py options] | prepare [DIR]" >&2
    exit 2
fi
py="${PYTHON:-python3}"
wheels="${GPU_CHECK_WHEELS:-.whl}"
site="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
if compgen -G "$wheels/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # inherited by every part and DataLoader worker
fi
if ! "$py" -c "import torch, monai, yacs, nibabel, pydicom, timm" 2>/dev/null; then
    echo "gpu_check.sh: $py cannot import torch, monai, yacs, nibabel, pydicom and timm, and no wheels" \
         "in $wheels supply them; run 'bash benchmarks/gpu_check.sh prepare' on a machine with network" \
         "and carry $wheels" >&2
    exit 2
fi
exec "$py" -m benchmarks.gpu_check "$@"
