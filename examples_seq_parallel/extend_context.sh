#!/usr/bin/env bash
# Extend the context of a Hugging Face RoPE model (Llama, or GPT-NeoX) FACTOR-fold:
#   1. import it                       tools/checkpoint/convert_from_hf.py  -> $OUT/imported (DCP)
#   2. evaluate it (before)            tools/evaluate_long_context.py at FACTOR x its context: loss by position
#                                      (the original context is the first 1/FACTOR of the curve) and passkey
#                                      retrieval at the original and the new length, SP over NPROC ranks
#   3. continue pretraining            pretrain_gpt.py at FACTOR x the context with RoPE scaling (SCALING,
#                                      yarn by default) and Ulysses SP                -> $OUT/extended
#   4. evaluate it again (after)       same evaluation, plots drawn against step 2's  -> $OUT/eval_after
#   5. export it                       tools/checkpoint/convert_to_hf.py              -> $OUT/hf
#
#   HF_DIR=llama-3.2-1b DATA_PATH=data/long_text_document TOKENIZER_TYPE=HFTokenizer \
#       TOKENIZER_MODEL=llama-3.2-1b/tokenizer.json NPROC=8 EXTRA_ARGS="--bf16" \
#       bash examples_seq_parallel/extend_context.sh
#
# Environment (defaults in brackets):
#   HF_DIR           the Hugging Face model directory (required; nothing is downloaded)
#   DATA_PATH        training data: a .bin/.idx prefix tokenized with the model's tokenizer, or Megatron's
#                    "W1 PREFIX1 W2 PREFIX2" blend (required)
#   EVAL_DATA_PATH   one prefix with documents longer than the new context, for loss by position [DATA_PATH]
#   TOKENIZER_TYPE TOKENIZER_MODEL VOCAB_FILE MERGE_FILE VOCAB_SIZE   the tokenizer flags [HFTokenizer]
#   ORIG_CONTEXT     the model's context [config.json's max_position_embeddings]   FACTOR [4]
#   SCALING          linear | dynamic | yarn | llama3 [yarn]           ROTARY_BASE  a new RoPE base [keep]
#   NPROC [2]  SP [NPROC]  MICRO_BATCH [1]  GLOBAL_BATCH [NPROC/SP]  TRAIN_ITERS [200]  LR [2e-5]
#   EVAL_NPROC       ranks of the evaluations (one SP group) [NPROC]; 1 runs them in one plain process
#   VOCAB_MULTIPLE   --make-vocab-size-divisible-by [128]
#   PASSKEY          "" for the text passkey with the tokenizer, or a --passkey-synthetic spec [""]
#   PASSKEY_LENGTHS [ORIG_CONTEXT NEW_CONTEXT]  PASSKEY_TRIALS [5]  EVAL_DOCS [8]  OUT [runs/extend_context]
#   EXTRA_ARGS       appended to pretrain_gpt.py (e.g. --bf16 --use-flash-attn-v2 --zero-stage 3)
#   EVAL_ARGS        appended to both evaluations (e.g. --bf16)
#   PYTHON           [.venv/bin/python]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3
: "${HF_DIR:?set HF_DIR to a local Hugging Face model directory}"
: "${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix tokenized with the tokenizer of the model}"
NPROC=${NPROC:-2}
SP=${SP:-$NPROC}
FACTOR=${FACTOR:-4}
SCALING=${SCALING:-yarn}
OUT=${OUT:-runs/extend_context}
VOCAB_MULTIPLE=${VOCAB_MULTIPLE:-128}
if [[ -z "${ORIG_CONTEXT:-}" ]]; then
  ORIG_CONTEXT=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["max_position_embeddings"])' \
                 "$HF_DIR/config.json")
fi
NEW_CONTEXT=$((ORIG_CONTEXT * FACTOR))
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
TORCHRUN=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" -m torch.distributed.run --standalone
          --nproc-per-node "$NPROC")

TOKENIZER_TYPE=${TOKENIZER_TYPE:-HFTokenizer}
TOKENIZER=(--tokenizer-type "$TOKENIZER_TYPE")
[[ -n "${TOKENIZER_MODEL:-}" ]] && TOKENIZER+=(--tokenizer-model "$TOKENIZER_MODEL")
[[ -n "${VOCAB_FILE:-}" ]] && TOKENIZER+=(--vocab-file "$VOCAB_FILE")
[[ -n "${MERGE_FILE:-}" ]] && TOKENIZER+=(--merge-file "$MERGE_FILE")
[[ -n "${VOCAB_SIZE:-}" ]] && TOKENIZER+=(--vocab-size "$VOCAB_SIZE")
EVAL_TOKENIZER=("${TOKENIZER[@]}")
[[ "$TOKENIZER_TYPE" == HFTokenizer ]] && EVAL_TOKENIZER[1]=HuggingFaceTokenizer  # the tools' name
read -r -a PASSKEY_LENGTHS <<< "${PASSKEY_LENGTHS:-$ORIG_CONTEXT $NEW_CONTEXT}"
PASSKEY_ARGS=(--passkey-lengths "${PASSKEY_LENGTHS[@]}" --passkey-trials "${PASSKEY_TRIALS:-5}")
[[ -n "${PASSKEY:-}" ]] && PASSKEY_ARGS+=(--passkey-synthetic "$PASSKEY")
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
EVAL_NPROC=${EVAL_NPROC:-$NPROC}
if [[ "$EVAL_NPROC" == 1 ]]; then
  EVAL_LAUNCH=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON")
else
  EVAL_LAUNCH=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" -m torch.distributed.run --standalone
               --nproc-per-node "$EVAL_NPROC")
fi
evaluate() {  # evaluate CHECKPOINT OUTPUT_DIR LABEL [more flags]
  local ckpt=$1 out=$2 label=$3
  shift 3
  run "${EVAL_LAUNCH[@]}" tools/evaluate_long_context.py --load "$ckpt" --data-path "${EVAL_DATA_PATH:-$DATA_PATH}" \
    --seq-length "$NEW_CONTEXT" --num-documents "${EVAL_DOCS:-8}" "${PASSKEY_ARGS[@]}" "${EVAL_TOKENIZER[@]}" \
    --output-dir "$out" --tensorboard-dir "$OUT/tensorboard/$label" --label "$label" "$@" "${EVAL_EXTRA[@]}"
}

# 1. import (the flags that rebuild the architecture go to model_flags.txt)
rm -rf "$OUT/imported"
IMPORT=(--hf-dir "$HF_DIR" --dcp "$OUT/imported" --make-vocab-size-divisible-by "$VOCAB_MULTIPLE"
        --flags-file "$OUT/model_flags.txt")
[[ -n "${ROTARY_BASE:-}" ]] && IMPORT+=(--rotary-base "$ROTARY_BASE")
run "$PYTHON" tools/checkpoint/convert_from_hf.py "${IMPORT[@]}"
read -r -a MODEL_FLAGS < "$OUT/model_flags.txt"

# 2. before: the imported model at the new length (its original context is the first 1/FACTOR)
evaluate "$OUT/imported" "$OUT/eval_before" "before" --trained-context "$ORIG_CONTEXT"

# 3. continue pretraining at FACTOR x the context: RoPE scaling from the original context, Ulysses SP
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
read -r -a DATA_WORDS <<< "$DATA_PATH"
rm -rf "$OUT/extended"
run "${TORCHRUN[@]}" pretrain_gpt.py "${MODEL_FLAGS[@]}" \
  --seq-length "$NEW_CONTEXT" --max-position-embeddings "$NEW_CONTEXT" \
  --rope-scaling-type "$SCALING" --rope-scaling-factor "$FACTOR" --original-max-position-embeddings "$ORIG_CONTEXT" \
  --ds-sequence-parallel-size "$SP" --micro-batch-size "${MICRO_BATCH:-1}" \
  --global-batch-size "${GLOBAL_BATCH:-$((NPROC / SP))}" --train-iters "${TRAIN_ITERS:-200}" \
  --lr "${LR:-2e-5}" --min-lr 0 --lr-decay-style cosine --lr-warmup-iters "${WARMUP:-0}" --weight-decay 0.0 \
  --hidden-dropout 0 --attention-dropout 0 --clip-grad 1.0 \
  --data-path "${DATA_WORDS[@]}" --split 98,2,0 "${TOKENIZER[@]}" \
  --load "$OUT/imported" --finetune --save "$OUT/extended" \
  --log-interval "${LOG_INTERVAL:-10}" --eval-iters 0 --tensorboard-dir "$OUT/tensorboard/train" \
  --log-json "$OUT/train_log.jsonl" "${EXTRA[@]}"

# 4. after: the same evaluation, curves drawn next to step 2's
evaluate "$OUT/extended" "$OUT/eval_after" "after (${SCALING} x${FACTOR})" \
  --compare "before=$OUT/eval_before/results.json"

# 5. export (the tokenizer recorded at training is copied; its end-of-document token becomes eos_token_id)
rm -rf "$OUT/hf"
run "$PYTHON" tools/checkpoint/convert_to_hf.py --load "$OUT/extended" --output "$OUT/hf"
echo "done: $OUT/eval_before, $OUT/eval_after (results.json, loss_by_position.png, passkey.png), $OUT/hf"
