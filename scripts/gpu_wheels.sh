#!/usr/bin/env bash
# Wheels for the packages benchmarks/gpu_check.sh needs that the device machine might lack (it has torch 2.11 on
# Python 3.12 and no package index): into .whl/ (git-ignored), which the device run carries.
#   bash scripts/gpu_wheels.sh        then   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], ...)
# The device's image already holds timm, safetensors and PyYAML (device tool, KINDS.md); gpu_check.sh installs a
# carried wheel only where the device's own copy is missing or does not import, so none of them is shadowed.
# timm is the version the tests run with here.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
TIMM=$(python3 -c "import timm; print(timm.__version__)" 2>/dev/null || echo 1.0.31)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "timm==$TIMM" safetensors pyyaml
ls -l .whl
