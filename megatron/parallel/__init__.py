"""Applying parallelism and memory strategy to a built model (torchtitan's `parallelize` step).

    parallelize.py    parallelize_gpt(model, parallel_state, parallel_config), validate_strategy
    wrappers.py       recompute, MLP tiling, offload, SP input handling (parameter names unchanged)
    data_parallel.py  ZeRO 0/1 (DDP) and 2/3 (FSDP2, half-precision gathers), memory accounting
    materialize.py    meta-device models: allocate this rank's shards, initialise them exactly
"""

from megatron.parallel.parallelize import build_core_attention, parallelize_gpt, validate_strategy

__all__ = ["build_core_attention", "parallelize_gpt", "validate_strategy"]
