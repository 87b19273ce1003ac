#!/usr/bin/env bash
# Downloads, on a machine with the package registries, the wheels the GPU machine lacks, into
# .whl/ (ignored by git, carried to the device by the `carry` of the device tool). The GPU image
# has torch, triton, transformers, peft, accelerate, safetensors, tokenizers, pillow, pytest,
# hypothesis; it lacks liger-kernel, trl and datasets (TRL's dependency), and this project.
# Python 3.12, x86-64, as on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --implementation cp "${plat[@]}" -d .whl "$@"; }
get "liger-kernel==0.8.5" "trl==1.16.0" "datasets" "dill" "multiprocess" "pytest-timeout"
python3 -m pip wheel -q --no-deps -w .whl .   # the project itself
ls -la .whl
