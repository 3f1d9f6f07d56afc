#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_suite.sh installs on the GPU machine (which has torch,
# transformers, accelerate and safetensors, but no diffusers, bitsandbytes, pydantic or ftfy, and no
# internet). Versions come from the lock (constraints.txt); the platform is the GPU machine's
# (CPython 3.12, manylinux x86-64). The folder .whl/ is ignored by git and carried to the machine.
#
#   bench/gpu_wheels.sh                          # into .whl/
#   XFORMERS="xformers==0.0.33" bench/gpu_wheels.sh   # also an xformers build made for the machine's torch
#
# xformers wheels are built for one torch version each: pick the one matching the GPU machine's torch
# (`python3 -c "import torch; print(torch.__version__)"` there), or leave it out and the suite reports
# the xformers checks as not run.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAMES="diffusers importlib-metadata lazy-importer bitsandbytes pydantic pydantic-core annotated-types typing-inspection ftfy wcwidth"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
specs=""
for name in $NAMES; do
  pin=$(grep -i -E "^${name//-/[-_]}==" constraints.txt | head -1 || true)
  specs="$specs ${pin:-$name}"
done
platforms=""
for n in 17 24 27 28 31 34 35 39; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms --platform manylinux2014_x86_64 -d .whl $specs ${XFORMERS:-}
ls -1 .whl
