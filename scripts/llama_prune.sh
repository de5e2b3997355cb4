#!/usr/bin/env bash
# Prune then recover (LLM-Pruner's scripts/llama_prune.sh): LLaMA-7B, 20 % of parameters, block-wise
# Taylor pruning of layers 4-29, then two epochs of LoRA on Alpaca-cleaned.
#
#   bash scripts/llama_prune.sh
#   BASE_MODEL=../shared/models/stories260K LAYER_START=1 LAYER_END=4 DEVICE=cpu EVAL_DEVICE=cpu \
#     DATA_PATH=../shared/data/alpaca/alpaca_5000.json MAX_STEPS=4 BATCH_SIZE=8 MICRO_BATCH_SIZE=4 \
#     VAL_SET_SIZE=8 bash scripts/llama_prune.sh                      # a seconds-long smoke run
#
# Every setting below can be overridden by an environment variable of the same name:
#   BASE_MODEL          HF id or folder to prune                     (huggyllama/llama-7b)
#   PRUNING_RATIO       fraction of heads/channels removed per layer (0.25: ~20 % of all parameters)
#   LAYER_START/END     decoder layers [start, end) pruned, attention and MLP alike (4 / 30)
#   PRUNE_NAME          folder under prune_log/                      (llama_prune)
#   TUNE_NAME           folder under tune_log/                       (llama_0.2)
#   DEVICE/EVAL_DEVICE  where importance is computed / evaluated      (cpu / cuda if present)
#   DATA_PATH           recovery data (HF name or local .json/.jsonl/.txt)     (yahma/alpaca-cleaned)
#   NUM_EPOCHS LEARNING_RATE BATCH_SIZE MICRO_BATCH_SIZE LORA_R CUTOFF_LEN VAL_SET_SIZE MAX_STEPS
#   PROMPT_TEMPLATE     alpaca, alpaca_short, vicuna                 (alpaca)
#   DTYPE               bf16, fp16 or fp32; empty: per device         ()
#   NPROC               processes for data-parallel recovery (torchrun) (1)
#   WANDB_PROJECT       log recovery to Weights & Biases; empty: no logger ()
#   PRUNE_FLAGS / TUNE_FLAGS  extra flags for hf_prune.py / post_training.py
set -euo pipefail
cd "$(dirname "$0")/.."

HAS_CUDA=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
BASE_MODEL=${BASE_MODEL:-huggyllama/llama-7b}
PRUNING_RATIO=${PRUNING_RATIO:-0.25}
LAYER_START=${LAYER_START:-4}
LAYER_END=${LAYER_END:-30}
PRUNE_NAME=${PRUNE_NAME:-llama_prune}
TUNE_NAME=${TUNE_NAME:-llama_0.2}
DEVICE=${DEVICE:-cpu}
EVAL_DEVICE=${EVAL_DEVICE:-$HAS_CUDA}
DATA_PATH=${DATA_PATH:-yahma/alpaca-cleaned}
NUM_EPOCHS=${NUM_EPOCHS:-2}
LEARNING_RATE=${LEARNING_RATE:-1e-4}
BATCH_SIZE=${BATCH_SIZE:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
LORA_R=${LORA_R:-8}
CUTOFF_LEN=${CUTOFF_LEN:-256}
VAL_SET_SIZE=${VAL_SET_SIZE:-2000}
MAX_STEPS=${MAX_STEPS:--1}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-alpaca}
DTYPE=${DTYPE:-}
NPROC=${NPROC:-1}
WANDB_PROJECT=${WANDB_PROJECT:-}
PRUNE_FLAGS=${PRUNE_FLAGS:-}
TUNE_FLAGS=${TUNE_FLAGS:-}

echo "[START] - pruning $BASE_MODEL at $PRUNING_RATIO (layers $LAYER_START-$((LAYER_END - 1)))"
# shellcheck disable=SC2086
python hf_prune.py --base_model "$BASE_MODEL" --pruning_ratio "$PRUNING_RATIO" \
  --device "$DEVICE" --eval_device "$EVAL_DEVICE" --block_wise \
  --block_mlp_layer_start "$LAYER_START" --block_mlp_layer_end "$LAYER_END" \
  --block_attention_layer_start "$LAYER_START" --block_attention_layer_end "$LAYER_END" \
  --pruner_type taylor --taylor param_first --save_ckpt_log_name "$PRUNE_NAME" --save_model $PRUNE_FLAGS
echo "[FINISH] - pruned model in prune_log/$PRUNE_NAME"

LAUNCH=(python)
if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC"); fi
OPTIONAL=()
if [ -n "$DTYPE" ]; then OPTIONAL+=(--dtype "$DTYPE"); fi
if [ -n "$WANDB_PROJECT" ]; then OPTIONAL+=(--wandb_project "$WANDB_PROJECT"); fi

echo "[START] - recovery with LoRA on $DATA_PATH ($NPROC process(es))"
# shellcheck disable=SC2086
"${LAUNCH[@]}" post_training.py --prune_model "prune_log/$PRUNE_NAME" --data_path "$DATA_PATH" \
  --output_dir "tune_log/$TUNE_NAME" --lora_r "$LORA_R" --num_epochs "$NUM_EPOCHS" \
  --learning_rate "$LEARNING_RATE" --batch_size "$BATCH_SIZE" --micro_batch_size "$MICRO_BATCH_SIZE" \
  --cutoff_len "$CUTOFF_LEN" --val_set_size "$VAL_SET_SIZE" --max_steps "$MAX_STEPS" \
  --prompt_template_name "$PROMPT_TEMPLATE" --merge "${OPTIONAL[@]}" $TUNE_FLAGS
echo "[FINISH] - pruned model: prune_log/$PRUNE_NAME; adapter: tune_log/$TUNE_NAME/adapter;" \
  "merged model: tune_log/$TUNE_NAME/merged"
