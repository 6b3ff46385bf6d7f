#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels `fastalign gpu-check` installs on the GPU machine (python 3.12,
# manylinux x86_64; no network there): the peers it compares against (trl, liger-kernel, cut-cross-entropy, peft) and what they need
# that the GPU image (torch 2.11, triton 3.6, transformers 5.17) lacks. Into .gpu-wheels/ (git-ignored); name it in
# the device tool's `carry`. One version of each, pure-python wheels: a few MiB, well under the 64 MiB transfer.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
WHEELS=(
  trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 peft==0.21.2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # trl imports datasets; the image has its other needs
)
rm -rf "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls "$DEST"
du -sh "$DEST"
