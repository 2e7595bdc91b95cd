"""Measure one rank's training step at full scale without a GPU: fake tensors, a fake process group.

The real model (`GPTModel` + `parallelize_gpt`: SP wrappers, tiling, recompute, offload,
FSDP2) runs one forward + backward of rank 0's shard under `FakeTensorMode` (tensors carry
shape, dtype and device, no data) with torch's fake process group standing in for the
other ranks (torch.testing._internal.distributed.fake_pg: collectives return at once), and
torch's own `MemTracker` (torch.distributed._tools.mem_tracker) counts every storage the
operators allocate, as torchtitan's memory estimation does. Parameters are FSDP2's real
shards, gradients and Adam's two moments are allocated like the shards (the state after a
first optimizer step), so the peak is the whole per-rank peak. It runs in seconds for an
8B model at millions of tokens.

What it cannot see, as any tracker of operator outputs: memory private to a kernel (the
CUDA flash backward's fp32 dQ accumulator, cuBLAS workspaces), the caching allocator's
rounding and fragmentation, NCCL buffers. The planner adds the first for `device="cuda"`
(memory_estimate.py); the rest is the `--reserve-gb` of tools/estimate_memory.py.

The tensors live on the fake "cpu" device (torch built without CUDA cannot run autograd on
fake CUDA tensors), so the kernels chosen are the CPU ones: the same SDPA flash path as on
CUDA in what it allocates (output + fp32 log-sum-exp). Compare with the planner's
`device="cpu"` estimate; `device="cuda"` adds only the kernel workspace listed above.

Run as a script (a process of its own: it initialises the fake process group):

    python -m megatron.planning.measure --preset llama3-8b --world-size 8 --seq-length 4194304 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

from megatron.config import ModelConfig, ParallelConfig
from megatron.planning.long_context import PRESETS, every_trick


def measure_step(model: ModelConfig, seq_length: int, parallel: ParallelConfig, *, world_size: int | None = None,
                 precision: str = "bf16", micro_batch_size: int = 1, debug: bool = False, fake: bool = True) -> dict:
    """Peak bytes of one forward + backward of this rank (rank 0 of a fake group: SP =
    parallel.sequence_parallel_size, DP = world / SP), counted by MemoryTracker.

    `fake=True`: under FakeTensorMode, initialising torch's fake process group of `world_size`
    ranks if none exists. `fake=False`: real tensors on the CPU, on the process group that
    exists (the test pool's gloo ranks) or none for SP 1 (small-scale validation).

    Returns `peak` (all tracked bytes at the peak), `static` (parameter shards, gradients,
    Adam state before the step), `peak_above_states` (= peak - static), `moments` (the peak
    of the forward, of the loss backward, and of the layers' backward, above the states),
    `host_peak` and `bytes_offloaded` (from the activation offloader) and `seconds`.
    """
    import contextlib  # noqa: PLC0415

    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    from megatron.core import parallel_state as ps  # noqa: PLC0415
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.parallel import parallelize_gpt  # noqa: PLC0415
    from megatron.planning.memory_tracker import DebugMemoryTracker, MemoryTracker  # noqa: PLC0415

    t0 = time.perf_counter()
    if fake and not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: PLC0415

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    elif world_size is not None and dist.is_initialized() and dist.get_world_size() != world_size:
        raise RuntimeError(f"a process group of {dist.get_world_size()} ranks exists; need {world_size}")
    state = None
    if dist.is_initialized():
        state = ps.initialize_model_parallel(sequence_parallel_size=parallel.sequence_parallel_size,
                                             ring_attention_size=parallel.ring_attention_size)
    local = seq_length // parallel.sequence_parallel_size
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        with torch.device("meta"):
            net = GPTModel(model)
        net = parallelize_gpt(net, state, parallel, device=torch.device("cpu"), precision=precision,
                              data_parallel=state is not None).train()
        if fake:  # the shard-length checks all-gather a value: nothing to gather here
            for module in (net, *net.modules()):
                for holder in (module, getattr(module, "sequence_parallel_inputs", None)):
                    if holder is not None and hasattr(holder, "_checked"):
                        holder._checked.add(local)
        params = list(net.parameters())
        # the state between steps: sharded fp32 gradients and Adam's two fp32 moments
        states = []
        for p in params:
            shard = _local(p)
            p.grad = _zeros_like_dtensor(p) if hasattr(p, "to_local") else torch.zeros_like(p)
            states += [torch.zeros_like(shard), torch.zeros_like(shard)]
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model.vocab_size, (micro_batch_size, local), generator=g)
        labels = torch.randint(0, model.vocab_size, (micro_batch_size, local), generator=g)
        tracker = DebugMemoryTracker() if debug else MemoryTracker()
        tracker.track_existing([*(_local(p) for p in params), *(_local(p.grad) for p in params), *states])
        static = tracker.live
        autocast = torch.autocast("cpu", dtype=half, cache_enabled=False) if half is not None else _null()
        moments = {}

        def loss_backward_done(grad):  # the last layer's output gets its gradient: its backward starts
            moments["loss_backward"] = tracker.peak
            tracker.reset_peak()

        def watch(module, args, out):
            if out.requires_grad:
                out.register_hook(loss_backward_done)

        last = getattr(net, "module", net).layers[-1].register_forward_hook(watch)
        with tracker:
            with autocast:
                loss = net(tokens, labels=labels)
            moments["forward"] = tracker.peak
            tracker.reset_peak()
            loss.float().sum().backward()
            del loss
            moments["layers_backward"] = tracker.peak
        last.remove()
        peak_snap = {"Total": max(moments.values())}
    offloader = getattr(net, "activation_offloader", None)
    off = offloader.stats() if offloader is not None else {"host_peak": 0, "bytes_offloaded": 0}
    return {
        "peak": peak_snap["Total"], "static": static, "peak_above_states": peak_snap["Total"] - static,
        "host_peak": off["host_peak"], "bytes_offloaded": off["bytes_offloaded"],
        "moments": {k: v - static for k, v in moments.items()},  # peaks above the states
        "seconds": time.perf_counter() - t0,
        "largest_at_peak": [(n, op) for n, op in getattr(tracker, "at_peak", [])[:200]],
        "at_peak_total": sum(n for n, _ in getattr(tracker, "at_peak", [])),
        "at_peak_count": len(getattr(tracker, "at_peak", [])),
    }


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _zeros_like_dtensor(p):
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return DTensor.from_local(torch.zeros_like(p.to_local()), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--num-layers", type=int, help="override the preset's layer count (reduced-scale runs)")
    ap.add_argument("--model-json", help="ModelConfig fields as JSON, replacing the preset's (e.g. a tiny model)")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--parallel", default="{}", help="ParallelConfig fields as JSON (default: every trick on "
                                                      "for this model, as megatron.planning.long_context chooses)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--debug", action="store_true", help="list the largest storages alive at the peak")
    args = ap.parse_args(argv)
    model = PRESETS[args.preset]()
    if args.model_json:
        fields = json.loads(args.model_json)
        model = (ModelConfig.llama if fields.pop("family", "llama") == "llama" else ModelConfig.gpt3)(**fields)
    if args.num_layers:
        model = model.replace(num_layers=args.num_layers)
    fields = json.loads(args.parallel)
    parallel = every_trick(model, args.seq_length, args.world_size, attention_backend="sdpa").replace(**fields)
    out = measure_step(model, args.seq_length, parallel, world_size=args.world_size, precision=args.precision,
                       debug=args.debug)
    if dist.is_initialized():
        dist.destroy_process_group()
    out["parallel"] = {k: getattr(parallel, k) for k in parallel.__dataclass_fields__}
    if args.json:
        print(json.dumps(out))
    else:
        gib = 2 ** 30
        print(f"N={args.seq_length:,} world {args.world_size}: peak {out['peak'] / gib:.2f} GiB (static "
              f"{out['static'] / gib:.2f}, above {out['peak_above_states'] / gib:.2f}), host peak "
              f"{out['host_peak'] / gib:.2f} GiB, {out['seconds']:.1f} s")
        if args.debug:
            print(f"  {out['at_peak_count']} storages made in the step alive at the peak, "
                  f"{out['at_peak_total'] / gib:.2f} GiB")
        for n, op in out["largest_at_peak"]:
            print(f"  {n / gib:8.3f} GiB  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
