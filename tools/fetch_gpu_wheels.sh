#!/usr/bin/env bash
# Downloads what tools/gpu_check.sh needs on the GPU machine, which has no network and whose image
# (Python 3.12, x86-64) lacks msgspec, pyzmq and the openai SDK (with its pydantic and httpx2
# stack): cp312 manylinux wheels into .gpu-wheels/ (gitignored; the device tool carries it), and
# the two trace files tetri-bench's mixed workload samples from (.gpu-wheels/traces; the shared
# folder does not travel). Run it here, where PyPI is reachable. Versions: the ones this
# project's tests run with.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
PKGS=(msgspec pyzmq openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0
      pydantic==2.13.4 pydantic-core==2.46.4 sniffio==1.3.1 annotated-types==0.7.0 typing-inspection==0.4.2)
for pkg in "${PKGS[@]}"; do
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done
TRACES=${TETRI_TRACES_DIR:-../shared/traces}
for rel in azure_llm_2023/AzureLLMInferenceTrace_conv.csv length_stats/sharegpt_8k_filtered_stats_llama2_tokenizer.csv; do
  mkdir -p "$DEST/traces/$(dirname "$rel")"
  cp "$TRACES/$rel" "$DEST/traces/$rel"
done
ls -l "$DEST"
