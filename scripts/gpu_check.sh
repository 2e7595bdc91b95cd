#!/usr/bin/env bash
# The one script for a GPU machine: bf16 training through pretrain_gpt.py with every available
# attention backend (loss agreement, tokens/s, MFU against the GPU's peak), the memory planner
# against torch.cuda.max_memory_allocated, and the Triton kernel against SDPA. Prints a table,
# exits non-zero on any failure. See benchmarks/gpu_check.py.
#   bash scripts/gpu_check.sh           on a CUDA machine (uses .venv if present, else python3)
#   bash scripts/gpu_check.sh --dry     the same code on CPU at tiny sizes (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
exec "$PYTHON" benchmarks/gpu_check.py "$@"
