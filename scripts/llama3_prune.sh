#!/usr/bin/env bash
# Prune then recover a Llama-3-style GQA model (Llama-3-8B: 32 layers, 32 query / 8 KV heads).
# Pruning removes whole KV groups (a KV head with its 4 query heads) so the GQA ratio is kept; bf16 is
# the default dtype on capable GPUs (Llama-3's range overflows fp16). Every variable of
# scripts/llama_prune.sh can be overridden.
#
#   bash scripts/llama3_prune.sh
#   BASE_MODEL=/models/Llama-3.1-8B-Instruct bash scripts/llama3_prune.sh
set -euo pipefail
export BASE_MODEL=${BASE_MODEL:-meta-llama/Meta-Llama-3-8B}
export PRUNING_RATIO=${PRUNING_RATIO:-0.25}
export LAYER_START=${LAYER_START:-4} LAYER_END=${LAYER_END:-30}
export PRUNE_NAME=${PRUNE_NAME:-llama3_prune} TUNE_NAME=${TUNE_NAME:-llama3_0.2}
export CUTOFF_LEN=${CUTOFF_LEN:-256}
exec bash "$(dirname "$0")/llama_prune.sh"
