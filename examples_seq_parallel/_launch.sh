# Shared launcher for the scripts in this folder (sourced, not run).
#
# The calling script sets MODEL_ARGS (an array of pretrain_gpt.py flags); this file adds
# the data flags, picks the launcher and runs it. Environment:
#   NNODES GPUS_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT   where and how many ranks
#   RDZV_BACKEND=c10d RDZV_ID=...     use torchrun's c10d rendezvous (set by the Slurm script)
#   DATA_PATH                          "prefix" or "w1 prefix1 w2 prefix2" (Megatron's --data-path)
#   TOKENIZER_TYPE VOCAB_FILE MERGE_FILE TOKENIZER_MODEL   tokenizer files (GPT-2 BPE by default)
#   MOCK_DATA=1                        synthetic tokens instead of DATA_PATH
#   CHECKPOINT_PATH TENSORBOARD_DIR    outputs
#   DRY_RUN=1                          validate and print the per-rank plan; launch nothing
#   PREFLIGHT=0                        skip the check before torchrun (see below)
#   EXTRA_ARGS                         appended verbatim (override any flag above)
#   PYTHON TORCHRUN                    interpreters (default: the repo's .venv if present)
#
# Before torchrun starts, `pretrain_gpt.py --preflight` checks the flags, the data, tokenizer and
# output paths and this machine once (a couple of seconds): a mistake ends here with one message,
# before any rank, GPU or process group is started. torchrun is run by _torchrun.py, which ends a
# failed job with one line naming the rank and its exit code instead of torchrun's traceback
# (ChildFailedError), so the ranks' own message (printed once per job) stays the last thing said.

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
TORCHRUN=${TORCHRUN:-"$PYTHON $ROOT/examples_seq_parallel/_torchrun.py"}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

DATA_ARGS=()
if [[ "${MOCK_DATA:-0}" == 1 || ( -z "${DATA_PATH:-}" && "${DRY_RUN:-0}" == 1 ) ]]; then
  [[ -z "${DATA_PATH:-}" && "${MOCK_DATA:-0}" != 1 ]] && \
    echo "note: DATA_PATH is not set; the dry run uses --mock-data with GPT-2's vocabulary size" >&2
  DATA_ARGS=(--mock-data --vocab-size "${VOCAB_SIZE:-50257}")
else
  if [[ -z "${DATA_PATH:-}" ]]; then
    echo "error: set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py output without .bin/.idx)," >&2
    echo "       or MOCK_DATA=1 for synthetic tokens, or DRY_RUN=1 to only check the configuration" >&2
    exit 2
  fi
  read -r -a DATA_PATH_WORDS <<< "$DATA_PATH"
  DATA_ARGS=(--data-path "${DATA_PATH_WORDS[@]}" --split "${SPLIT:-949,50,1}"
             --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}")
  [[ -n "${VOCAB_FILE:-}" ]] && DATA_ARGS+=(--vocab-file "$VOCAB_FILE")
  [[ -n "${MERGE_FILE:-}" ]] && DATA_ARGS+=(--merge-file "$MERGE_FILE")
  [[ -n "${TOKENIZER_MODEL:-}" ]] && DATA_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
fi
OUTPUT_ARGS=()
[[ -n "${CHECKPOINT_PATH:-}" ]] && OUTPUT_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH")
[[ -n "${TENSORBOARD_DIR:-}" ]] && OUTPUT_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ALL_ARGS=("${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  CMD=(env WORLD_SIZE="$WORLD_SIZE" GPUS_PER_NODE="$GPUS_PER_NODE" $PYTHON "$ROOT/pretrain_gpt.py" --dry-run "${ALL_ARGS[@]}")
else
  if [[ "${RDZV_BACKEND:-}" == c10d ]]; then
    LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d
            --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-ulysses}")
  else
    LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
            --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  fi
  if [[ " ${ALL_ARGS[*]} " == *" --exit-signal-handler "* ]]; then
    # SIGTERM (Slurm preemption, scancel --signal=TERM) must reach the ranks, which finish
    # their iteration, save and exit 0; torchrun itself would kill them and exit 1. Only newer
    # torchrun has --signals-to-handle; an older one passes SIGTERM on to the ranks when it
    # shuts down (they still save) and then exits non-zero.
    if [[ "$TORCHRUN" == "$PYTHON $ROOT/examples_seq_parallel/_torchrun.py" ]]; then
      # torch's own torchrun: read its source instead of importing torch for --help (~2 CPU-s a node)
      TORCH_DIR=$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")')
      TORCHRUN_HELP=$(cat "$TORCH_DIR/distributed/run.py" 2>/dev/null || true)
    else
      TORCHRUN_HELP=$($TORCHRUN --help 2>/dev/null || true)
    fi
    if [[ "$TORCHRUN_HELP" == *--signals-to-handle* ]]; then
      LAUNCH+=(--signals-to-handle SIGINT,SIGHUP,SIGQUIT)
      trap '' TERM
    else
      echo "note: this torchrun has no --signals-to-handle: on SIGTERM it forwards the signal to the ranks" \
           "(they save) and exits non-zero" >&2
    fi
  fi
  CMD=($TORCHRUN "${LAUNCH[@]}" "$ROOT/pretrain_gpt.py" "${ALL_ARGS[@]}")
fi
echo "+ ${CMD[*]}"
if [[ "${DRY_RUN:-0}" != 1 && "${PREFLIGHT:-1}" == 1 ]]; then
  env WORLD_SIZE="$WORLD_SIZE" GPUS_PER_NODE="$GPUS_PER_NODE" $PYTHON "$ROOT/pretrain_gpt.py" --preflight \
    "${ALL_ARGS[@]}" || exit $?
fi
exec "${CMD[@]}"
