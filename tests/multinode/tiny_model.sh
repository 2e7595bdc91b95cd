#!/usr/bin/env bash
# The tiny model of tests/multinode/runs.py as a launch script for the project's Slurm batch
# script, written the way a user writes one for their own model: MODEL_ARGS, then the
# project's _launch.sh (data flags, CHECKPOINT_PATH, EXTRA_ARGS, torchrun with c10d).
#
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 \
#       --export=ALL,GPUS_PER_NODE=2,MOCK_DATA=1,VOCAB_SIZE=256 \
#       examples_seq_parallel/slurm_pretrain_gpt.sbatch ../tests/multinode/tiny_model.sh
#
# Environment: SP (4), TINY_ARGS (the flags, passed by the test so that they are the ones
# of its reference run), plus everything _launch.sh reads.
set -euo pipefail
read -r -a MODEL_ARGS <<< "${TINY_ARGS:?set TINY_ARGS to the tiny model flags (tests/multinode/runs.py)}"
MODEL_ARGS+=(--ds-sequence-parallel-size "${SP:-4}")
source "$(dirname "${BASH_SOURCE[0]}")/../../examples_seq_parallel/_launch.sh"
