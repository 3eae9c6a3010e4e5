#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels of the mr1 dependencies that the GPU image of
# the device machine lacks (it has jax, flax, optax, orbax, chex, transformers, torch, ...; not
# nltk, its defusedxml, or ml-collections). Run it here, where pip reaches the registry; the
# device command carries .whl and launch/device_check.sh installs them with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(nltk==3.10.4 defusedxml==0.7.1 ml-collections==1.1.0)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
