#!/usr/bin/env bash
# Create (or reuse) .venv with a deliberate torch build, then the project's dependencies.
#   scripts/setup_env.sh         runtime only
#   scripts/setup_env.sh --dev   plus test tools (pytest, ruff, transformers, triton)
# TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "error: Python 3.10+ is needed, $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC (pinned first so nothing pulls a CUDA build by accident)"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "[setup] installing requirements.txt and the project (editable)"
"${PIP[@]}" install -r requirements.txt
"${PIP[@]}" install --no-deps -e .
if [ "${1:-}" = "--dev" ]; then
  echo "[setup] installing requirements-dev.txt"
  "${PIP[@]}" install -r requirements-dev.txt
fi
.venv/bin/python -c 'import torch; print(f"[setup] ready: torch {torch.__version__}, .venv/bin/python")'
