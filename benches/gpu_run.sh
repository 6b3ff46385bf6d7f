#!/usr/bin/env bash
# The one prepared command for a GPU machine lent by the device tool: `fastalign gpu-check` with its results, pytest's
# log and its own output written into $OUT, the only folder whose files come back. From the development machine:
#   bash benches/gpu_wheels.sh        # once, with network: the peers' wheels into .gpu-wheels/
#   device run: command "FASTALIGN_COMMIT=<the short hash, typed in> bash benches/gpu_run.sh" (expanded here: the
#               copied tree has no .git, so $(git ...) there records "unknown"), carry [".gpu-wheels"], timeout_s 480
#   then: mkdir -p benches/results && cp <files_at>/*.json benches/results/ && fastalign report --write; commit both.
# Arguments go on to gpu-check: CI runs this script with `--rehearse --budget 150` on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONUNBUFFERED=1
# The copied tree has no .git: without the hash typed in, the results would name no commit.
if [ ! -d .git ] && [ -z "${FASTALIGN_COMMIT:-}" ] && [[ " $* " != *" --rehearse "* ]]; then
  echo "gpu_run.sh: set FASTALIGN_COMMIT=<the short hash> (this tree has no .git to read it from)" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m fastalign.cli gpu-check --budget 300 --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.out"
