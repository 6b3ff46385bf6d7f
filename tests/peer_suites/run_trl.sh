#!/bin/bash
# TRL's own DPOTrainer / KTOTrainer tests on offline tiny models, with TRL's trainers ("trl") or fastalign's
# ("fastalign") in their place. Nothing of TRL is committed: its tests/ and scripts/ are extracted from a TRL git
# checkout into $TRL_WORK. usage: run_trl.sh trl|fastalign [pytest args ...]
#   TRL_WORK  work dir (default /tmp/fastalign-trl-suite)
#   TRL_GIT   a TRL git dir (default: the fetch tool's mirror if present, else a bare clone from GitHub into TRL_WORK)
#   TRL_REV   the commit whose tests run (default the one measured in the README)
set -e
H=$(cd "$(dirname "$0")" && pwd)
W=${TRL_WORK:-/tmp/fastalign-trl-suite}
REV=${TRL_REV:-f2cd57710ae345ea6428ae95363267fcf38a3dc8}
SRC=${TRL_GIT:-/work/.mirror/huggingface+trl/repo}
MODELS="for_causal_lm.qwen2_for_causal_lm_2_5 for_causal_lm.cohere2_for_causal_lm for_causal_lm.glm4_moe_for_causal_lm
for_causal_lm.gpt_oss_for_causal_lm for_causal_lm.qwen3_moe_for_causal_lm for_causal_lm.nemotron_3_nano_for_causal_lm
for_causal_lm.olmo3_for_causal_lm for_causal_lm.lfm2_for_causal_lm for_causal_lm.lfm2_for_causal_lm_2_5
for_causal_lm.remote_for_causal_lm"
mkdir -p "$W"
if [ ! -d "$W/tests" ]; then
  if [ ! -d "$SRC" ]; then
    SRC=$W/trl.git
    [ -d "$SRC" ] || git clone -q --bare https://github.com/huggingface/trl "$SRC"
  fi
  git --git-dir="$SRC" archive "$REV" tests scripts | tar -x -C "$W"
  python "$H/fixup_tests.py" "$W"
fi
grep -q FASTALIGN_TRAINERS "$W/tests/conftest.py" || { printf '\n\n'; cat "$H/conftest_addon.py"; } >> "$W/tests/conftest.py"
[ -d "$W/trl-internal-testing/tiny-Qwen2ForCausalLM-2.5" ] || (cd "$W" && python "$H/build_hub.py" "$W" "$W" $MODELS)
cd "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
which=$1; shift
[ "$which" = fastalign ] && export FASTALIGN_TRAINERS=1 || export FASTALIGN_TRAINERS=0
exec python -m pytest -p no:cacheprovider -q -rA "$@"
