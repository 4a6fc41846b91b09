#!/usr/bin/env bash
# Downloads the wheels tools/gpu_check.sh installs on the GPU machine, which has no network and
# whose image (Python 3.12, x86-64) lacks msgspec and pyzmq: cp312 manylinux wheels into
# .gpu-wheels/ (gitignored; the device tool carries it). Run it here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
for pkg in msgspec pyzmq; do
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done
ls -l "$DEST"
