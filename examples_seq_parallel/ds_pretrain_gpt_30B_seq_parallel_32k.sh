#!/usr/bin/env bash
# GPT-3 30B (64 layers, hidden 6144, 64 heads) on 32k-token sequences with
# DeepSpeed-Ulysses sequence parallelism 8 and ZeRO-3 (FSDP2 per layer).
#
#   NNODES=1 GPUS_PER_NODE=8 DATA_PATH=/data/pile_text_document \
#     VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#     bash examples_seq_parallel/ds_pretrain_gpt_30B_seq_parallel_32k.sh
#   DRY_RUN=1 NNODES=4 GPUS_PER_NODE=8 bash examples_seq_parallel/ds_pretrain_gpt_30B_seq_parallel_32k.sh
#
# With SP 8, world/8 ranks are data parallel; the global batch (GLOBAL_BATCH) defaults to
# one sequence per data-parallel rank and must be a multiple of that. The defaults fit one
# 8x80GB node (65.70 GiB peak per GPU by tools/estimate_memory.py, longest N 115k; SP 4 fits too:
# 69.85 GiB, longest N 62k).
# All variables of _launch.sh apply.
set -euo pipefail

SEQ_LEN=${SEQ_LEN:-32768}
SP=${SP:-8}  # one 8x80GB node by tools/estimate_memory.py: SP 8 65.70 GiB/GPU (longest N 115k), SP 4 69.85 (62k)
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
PRECISION_FLAG=--${PRECISION:-bf16}   # bf16 or fp16
WORLD=$(( ${NNODES:-1} * ${GPUS_PER_NODE:-8} ))
GLOBAL_BATCH=${GLOBAL_BATCH:-$(( WORLD >= SP ? WORLD / SP : 1 ))}  # one sequence per data-parallel rank

MODEL_ARGS=(
  --num-layers 64 --hidden-size 6144 --num-attention-heads 64
  --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
  --init-method-std 0.008
  --ds-sequence-parallel-size "$SP" --zero-stage 3
  --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH"
  --train-tokens "$TRAIN_TOKENS" --lr-decay-tokens "$TRAIN_TOKENS" --lr-warmup-tokens "${WARMUP_TOKENS:-375000000}"
  --lr 1e-4 --min-lr 1e-6 --lr-decay-style cosine
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
  "$PRECISION_FLAG"
  --use-flash-attn-v2 --checkpoint-activations
  --log-interval 10 --eval-interval 100 --eval-iters 10 --save-interval 1000
  --seed "${SEED:-1234}"
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
