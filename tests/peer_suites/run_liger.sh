#!/bin/bash
# Liger-Kernel 0.8.5's own test/chunked_loss/test_dpo_loss.py and test_kto_loss.py with fastalign's fused-linear
# modules in place of Liger's ("fastalign") or Liger itself ("liger"). Nothing of Liger is committed: its sdist comes
# from PyPI into $LIGER_WORK (default /tmp/fastalign-liger-suite). usage: run_liger.sh fastalign|liger [pytest args]
set -e
H=$(cd "$(dirname "$0")" && pwd)
W=${LIGER_WORK:-/tmp/fastalign-liger-suite}
if [ ! -d "$W/liger_kernel-0.8.5" ]; then
  mkdir -p "$W" && (cd "$W" && pip download liger-kernel==0.8.5 --no-binary :all: --no-deps -d . -q && tar xzf liger_kernel-0.8.5.tar.gz)
fi
cd "$W/liger_kernel-0.8.5"
which=$1; shift
[ "$which" = fastalign ] && export FASTALIGN_LIGER=1 || export FASTALIGN_LIGER=0
export PYTHONPATH="$H${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pytest -p no:cacheprovider -p liger_fastalign_plugin -q "$@"
