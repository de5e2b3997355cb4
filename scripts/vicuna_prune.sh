#!/usr/bin/env bash
# Prune then recover Vicuna-7B (LLaMA architecture, 32 layers): the LLaMA preset with Vicuna's model,
# folder names and conversation template. Every variable of scripts/llama_prune.sh can be overridden.
#
#   bash scripts/vicuna_prune.sh
#   BASE_MODEL=/models/vicuna-13b-v1.5 LAYER_END=38 bash scripts/vicuna_prune.sh   # 40-layer 13B
set -euo pipefail
export BASE_MODEL=${BASE_MODEL:-lmsys/vicuna-7b-v1.5}
export PRUNING_RATIO=${PRUNING_RATIO:-0.25}
export LAYER_START=${LAYER_START:-4} LAYER_END=${LAYER_END:-30}
export PRUNE_NAME=${PRUNE_NAME:-vicuna_prune} TUNE_NAME=${TUNE_NAME:-vicuna_0.2}
export PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-vicuna}
exec bash "$(dirname "$0")/llama_prune.sh"
