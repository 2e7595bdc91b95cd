#!/usr/bin/env bash
# The tiny CPU default: a 4-layer GPT (hidden 256, 8 heads) on 2048-token sequences, split
# over two ranks with Ulysses sequence parallelism (SP=2), fp32, one thread per rank.
# Builds the embedded corpus and its SentencePiece tokenizer into data/corpus on first use,
# evaluates every EVAL_INTERVAL iterations, logs to TensorBoard and saves a checkpoint.
#
#   bash examples_seq_parallel/pretrain_gpt_tiny_cpu.sh [extra pretrain_gpt.py flags]
#   DRY_RUN=1 bash examples_seq_parallel/pretrain_gpt_tiny_cpu.sh
#
# Environment: NPROC (2), SP (2), TRAIN_ITERS (300), EVAL_INTERVAL (50), OUT (runs/tiny_cpu),
# CORPUS_DIR (data/corpus), PYTHON (.venv/bin/python).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3
NPROC=${NPROC:-2}
SP=${SP:-2}
CORPUS_DIR=${CORPUS_DIR:-data/corpus}
OUT=${OUT:-runs/tiny_cpu}

if [[ ! -f "$CORPUS_DIR/corpus_text_document.idx" || ! -f "$CORPUS_DIR/tokenizer.model" ]]; then
  echo "+ $PYTHON tools/build_corpus.py --output-dir $CORPUS_DIR"
  "$PYTHON" tools/build_corpus.py --output-dir "$CORPUS_DIR"
fi

ARGS=(
  --num-layers 4 --hidden-size 256 --num-attention-heads 8
  --seq-length 2048 --max-position-embeddings 2048
  --ds-sequence-parallel-size "$SP" --zero-stage 0
  --micro-batch-size 1 --global-batch-size $((NPROC / SP))
  --train-iters "${TRAIN_ITERS:-300}"
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --init-method-std 0.02
  --hidden-dropout 0 --attention-dropout 0
  --data-path "$CORPUS_DIR/corpus_text_document" --split 98,1,1
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$CORPUS_DIR/tokenizer.model"
  --log-interval 10 --eval-interval "${EVAL_INTERVAL:-50}" --eval-iters 2
  --tensorboard-dir "$OUT/tensorboard" --log-json "$OUT/log.jsonl"
  --save "$OUT/checkpoints" --load "$OUT/checkpoints"  # a second run resumes instead of overwriting
  --seed 1234
  "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  CMD=(env WORLD_SIZE="$NPROC" "$PYTHON" pretrain_gpt.py --dry-run "${ARGS[@]}")
else
  CMD=(env OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"
       pretrain_gpt.py "${ARGS[@]}")
fi
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
