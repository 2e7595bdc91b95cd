#!/usr/bin/env bash
# Quickstart: set up .venv (CPU torch, pinned first), build the embedded corpus and its
# tokenizer, and train a small GPT with Ulysses SP=2 on two CPU ranks (~10 minutes).
#   bash scripts/quickstart.sh            (extra args go to pretrain_gpt.py, e.g. --train-iters 50)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec bash examples_seq_parallel/pretrain_gpt_tiny_cpu.sh "$@"
