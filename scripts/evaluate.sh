#!/usr/bin/env bash
# Evaluate base, pruned and pruned+LoRA checkpoints into one table (results.md + results.json).
# Usage: scripts/evaluate.sh BASE PRUNED [LORA_RUN_DIR [STEP ...]] -- extra evaluate.py flags
#   scripts/evaluate.sh ../shared/models/stories260K out/pruned out/tune 200 400 -- --limit 100
# The reference's order works too: BASE TUNE_DIR PRUNE_CKPT STEP... (recognised by TUNE_DIR holding
# checkpoint-*/ or adapter_config.json); its pickled PRUNE_CKPT needs "-- --allow_pickle".
# Env: OUT (default results/), DATA (default ../shared/data): local data used when present.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n 2,7p "$0"; exit 2; }
is_lora_run() { [[ -f $1/adapter_config.json ]] || compgen -G "$1/checkpoint-*" > /dev/null; }
if [[ $# -ge 3 && $3 != "--" ]] && is_lora_run "$2" && ! is_lora_run "$3"; then
  BASE=$1; LORA=$2; PRUNED=$3; shift 3          # the reference's BASE TUNE_DIR PRUNE_CKPT EPOCHS...
  set -- "$LORA" "$@"
else
  BASE=$1; PRUNED=$2; shift 2
fi
CKPTS=("base=$BASE" "pruned=$PRUNED")
if [[ $# -gt 0 && $1 != "--" ]]; then
  LORA=$1; shift
  while [[ $# -gt 0 && $1 != "--" ]]; do CKPTS+=("lora-$1=$PRUNED+$LORA/checkpoint-$1"); shift; done
  [[ ${#CKPTS[@]} -gt 2 ]] || CKPTS+=("lora=$PRUNED+$LORA")
fi
[[ ${1:-} == "--" ]] && shift
DATA=${DATA:-../shared/data}
LOCAL=()
[[ -d $DATA/wikitext2 ]] && LOCAL+=(--data_dir "$DATA")
[[ -d $DATA/zeroshot ]] && LOCAL+=(--zeroshot_dir "$DATA/zeroshot")
exec python evaluate.py --checkpoints "${CKPTS[@]}" --output_dir "${OUT:-results}" "${LOCAL[@]}" "$@"
