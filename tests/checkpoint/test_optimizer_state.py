"""Optimizer implementations and ZeRO-1 through save and resume.

- `--optimizer-impl`: torch fused AdamW by default even when apex is importable; apex only
  when asked for, validated at flag time (stages 0/1, CUDA, a CUDA build of apex).
- apex FusedAdam (a CPU stand-in with its exact interface, tests/checkpoint/apex_stand_in.py)
  under ZeRO 0 and 1: N + N iterations after a resume equal 2N straight, bitwise, which
  needs its group-level step count back; checkpoints cross between apex and torch.
- ZeRO-1 saves and loads sharded: each optimizer entry is written by the rank that owns the
  parameter, and after a load each rank holds only its own partition's moments.
- ZeRO-1 as the source layout: its checkpoint trains on under ZeRO 0/2/3 and other SP/DP
  layouts on the same loss curve (rel. err. < 1e-5).
Runtime ~35 s on 2 cores (pools of 1, 2 and 4 ranks).
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from megatron.config import ConfigError
from tests.checkpoint import apex_stand_in

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --mock-data --vocab-size 250 "
        "--micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 1 --lr-decay-iters 6 "
        "--lr-decay-style cosine --eval-iters 0 --log-interval 100 --seed 6").split()
DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1".split()
NO_DROPOUT = "--hidden-dropout 0 --attention-dropout 0".split()


def _train(path) -> list[dict]:
    return [e for e in map(json.loads, open(path)) if e["event"] == "train"]


def _losses(path) -> list[float]:
    return [e["lm_loss"] for e in _train(path)]


# ------------------------------------------------------------------------------ flags


def _argv(*extra):
    return BASE + NO_DROPOUT + ["--train-iters", "1", *extra]


def test_default_is_torch_even_with_apex_importable(monkeypatch):
    """A GPU-only package being installed must not change the optimizer (it broke resumes)."""
    from megatron.arguments import parse_args
    from megatron.model import GPTModel
    from megatron.training.optimizer import build_optimizer

    fake = types.ModuleType("apex.optimizers")
    fake.FusedAdam = apex_stand_in.FusedAdam
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake)
    cfg = parse_args(_argv(), world_size=1)
    assert cfg.optim.optimizer_impl == "torch"
    opt, name = build_optimizer(GPTModel(cfg.model), cfg.optim, 0, None)
    assert isinstance(opt, torch.optim.AdamW) and name == "torch.AdamW(fused)"


def test_apex_is_validated_at_flag_time(monkeypatch):
    from megatron.arguments import parse_args
    from megatron.training import optimizer

    with pytest.raises(ConfigError, match="--optimizer-impl apex works with --zero-stage 0 or 1.*--zero-stage 3"):
        parse_args(_argv("--optimizer-impl", "apex", "--zero-stage", "3"), world_size=1)
    with pytest.raises(ConfigError, match="--optimizer-impl apex needs a CUDA GPU"):
        parse_args(_argv("--optimizer-impl", "apex"), world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check, to the package
    monkeypatch.setattr(optimizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="NVIDIA apex is not installed; build NVIDIA apex from source"):
        optimizer.apex_fused_adam()
    monkeypatch.undo()
    # a Python-only build: FusedAdam imports, but its constructor would raise RuntimeError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(optimizer.importlib.util, "find_spec", lambda name: object())
    mta = types.ModuleType("apex.multi_tensor_apply")
    mta.multi_tensor_applier = types.SimpleNamespace(available=False, import_err=ImportError("No module 'amp_C'"))
    opts = types.ModuleType("apex.optimizers")
    opts.FusedAdam = apex_stand_in.FusedAdam
    for name, mod in (("apex", types.ModuleType("apex")), ("apex.optimizers", opts), ("apex.multi_tensor_apply", mta)):
        monkeypatch.setitem(sys.modules, name, mod)
    with pytest.raises(ConfigError, match="without its CUDA extensions.*amp_C"):
        optimizer.apex_fused_adam()
    mta.multi_tensor_applier.available = True
    assert optimizer.apex_fused_adam() is apex_stand_in.FusedAdam
    # the unrelated PyPI package "apex" has no apex.optimizers
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    with pytest.raises(ConfigError, match="fails.*unrelated project"):
        optimizer.apex_fused_adam()


def test_stand_in_has_apex_interface_and_zero_grad_copes(monkeypatch):
    from megatron.training.optimizer import zero_grad

    p = torch.nn.Parameter(torch.ones(3))
    opt = apex_stand_in.FusedAdam([p], lr=0.1, weight_decay=0.0)
    with pytest.raises(TypeError):
        opt.zero_grad(set_to_none=True)  # apex's zero_grad takes no argument
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
        zero_grad(opt)
        assert p.grad is None
    assert opt.param_groups[0]["step"] == 2 and set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
    # same update as torch AdamW (apex's kernel computes the same formula)
    q = torch.nn.Parameter(torch.ones(3))
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)
    for _ in range(2):
        q.grad = torch.ones(3)
        ref.step()
    assert torch.allclose(p, q, rtol=1e-6)


# ------------------------------------------------------------------------------ save and resume


def _resume_runs(root: str) -> dict:
    """On 2 ranks (SP 2): apex under ZeRO 1 and 0, straight and 3 + 3; crossings with torch."""
    import pretrain_gpt

    undo = apex_stand_in.install()
    j = os.path.join
    try:
        def run(extra, log):
            assert pretrain_gpt.main(BASE + DROPOUT + ["--ds-sequence-parallel-size", "2", "--log-json",
                                                       j(root, log)] + extra) == 0

        for z in ("1", "0"):
            apex = ["--zero-stage", z, "--optimizer-impl", "apex"]
            run(apex + ["--train-iters", "6"], f"apex{z}_full.jsonl")
            run(apex + ["--train-iters", "3", "--save", j(root, f"apex{z}")], f"apex{z}_first.jsonl")
            run(apex + ["--train-iters", "6", "--load", j(root, f"apex{z}")], f"apex{z}_second.jsonl")
        # apex -> torch (ZeRO 1 and FSDP), torch -> apex
        run(["--zero-stage", "1", "--train-iters", "6", "--load", j(root, "apex1")], "apex_to_torch1.jsonl")
        run(["--zero-stage", "3", "--train-iters", "6", "--load", j(root, "apex1")], "apex_to_torch3.jsonl")
        run(["--zero-stage", "1", "--train-iters", "6"], "torch_full.jsonl")
        run(["--zero-stage", "1", "--train-iters", "3", "--save", j(root, "torch1")], "torch_first.jsonl")
        run(["--zero-stage", "0", "--optimizer-impl", "apex", "--train-iters", "6", "--load", j(root, "torch1")],
            "torch_to_apex0.jsonl")
    finally:
        undo()


def test_apex_resumes_bitwise_and_crosses_with_torch(ranks, tmp_path):
    ranks(2, _resume_runs, str(tmp_path))
    for z in ("1", "0"):
        first, second = _losses(tmp_path / f"apex{z}_first.jsonl"), _losses(tmp_path / f"apex{z}_second.jsonl")
        assert [e["iteration"] for e in _train(tmp_path / f"apex{z}_second.jsonl")] == [4, 5, 6]
        assert first + second == _losses(tmp_path / f"apex{z}_full.jsonl"), f"ZeRO {z}"  # bitwise
    # the same formula in another kernel: equal up to rounding, whichever implementation loads
    for crossed, ref in (("apex_to_torch1", "apex1_full"), ("apex_to_torch3", "apex1_full"),
                         ("torch_to_apex0", "torch_full")):
        got, want = _losses(tmp_path / f"{crossed}.jsonl"), _losses(tmp_path / f"{ref}.jsonl")[3:]
        assert got == pytest.approx(want, rel=1e-5), crossed
    assert _losses(tmp_path / "torch_full.jsonl") != _losses(tmp_path / "apex1_full.jsonl")  # not the same run


def _zero1_sharding(root: str) -> dict:
    """World 2 (SP 2, ZeRO 1): who wrote each optimizer entry, and what each rank holds after a load."""
    import torch.distributed as dist

    from megatron.arguments import parse_args
    from megatron.checkpoint.format import checkpoint_dir, read_metadata
    from megatron.training import pretrain

    stash = {}
    argv = BASE + NO_DROPOUT + ["--ds-sequence-parallel-size", "2", "--zero-stage", "1"]
    pretrain(parse_args(argv + ["--train-iters", "2", "--save", os.path.join(root, "ck")]),
             trainer_hook=lambda t: stash.update(saved=t))
    pretrain(parse_args(argv + ["--train-iters", "2", "--load", os.path.join(root, "ck")]),
             trainer_hook=lambda t: stash.update(loaded=t))

    def owned(t):
        names = {p: n.removeprefix("module.") for n, p in t.model.named_parameters()}
        return {names[p] for g in t.optimizer.optim.param_groups for p in g["params"]}

    md = read_metadata(checkpoint_dir(os.path.join(root, "ck"), 2))
    lookup = md.planner_data
    writer = {}
    for index, info in md.storage_data.items():
        path = lookup.get(index.fqn, (index.fqn,))
        if path[:2] == ("optimizer", "state"):
            writer.setdefault(path[2], set()).add(int(info.relative_path.split("_")[2]))
    loaded = stash["loaded"].optimizer
    names = {p: n.removeprefix("module.") for n, p in stash["loaded"].model.named_parameters()}
    held = {names[p] for p, s in loaded.optim.state.items() if s}
    return {"rank": dist.get_rank(), "owned_at_save": owned(stash["saved"]), "writer": writer,
            "owned_at_load": owned(stash["loaded"]), "held": held, "wrapper_state": len(loaded.state),
            "moments": sum(s["exp_avg"].numel() for s in loaded.optim.state.values() if s),
            "params": sum(p.numel() for p in stash["loaded"].model.parameters())}


def test_zero1_writes_and_reads_only_its_partition(ranks, tmp_path):
    out = ranks(2, _zero1_sharding, str(tmp_path))
    writer = out[0]["writer"]
    assert set(writer) == out[0]["owned_at_save"] | out[1]["owned_at_save"]
    for r in out:
        assert r["owned_at_save"] and all(writer[n] == {r["rank"]} for n in r["owned_at_save"])
        assert r["held"] == r["owned_at_load"] and r["wrapper_state"] == 0
        assert r["moments"] < r["params"]  # a partition, not the full state
    assert out[0]["moments"] + out[1]["moments"] == out[0]["params"]


def _run(runs: list) -> None:
    import pretrain_gpt

    for argv in runs:
        assert pretrain_gpt.main(argv) == 0, argv


def test_zero1_checkpoint_reshards_to_other_layouts(ranks, tmp_path):
    common = BASE + NO_DROPOUT + ["--train-iters", "4", "--eval-interval", "2"]
    src = str(tmp_path / "z1")
    ranks(2, _run, [common + ["--ds-sequence-parallel-size", "2", "--zero-stage", "1", "--save", src,
                              "--save-interval", "2", "--log-json", str(tmp_path / "z1.jsonl")]])
    (tmp_path / "z1" / "latest_checkpointed_iteration.txt").write_text("2")
    targets = {1: {"sp1_z0": "--ds-sequence-parallel-size 1 --zero-stage 0"},
               2: {"sp2_z3": "--ds-sequence-parallel-size 2 --zero-stage 3",
                   "sp1dp2_z1": "--ds-sequence-parallel-size 1 --zero-stage 1"},
               4: {"dp2sp2_z2": "--ds-sequence-parallel-size 2 --zero-stage 2",
                   "dp2sp2_z1": "--ds-sequence-parallel-size 2 --zero-stage 1"}}
    for world, runs in targets.items():
        ranks(world, _run, [common + flags.split() + ["--load", src, "--log-json", str(tmp_path / f"{n}.jsonl")]
                            for n, flags in runs.items()])
    ref = _losses(tmp_path / "z1.jsonl")[2:]
    for runs in targets.values():
        for name in runs:
            assert [e["iteration"] for e in _train(tmp_path / f"{name}.jsonl")] == [3, 4], name
            assert _losses(tmp_path / f"{name}.jsonl") == pytest.approx(ref, rel=1e-5), name
