"""Megatron-DeepSpeed's own launch scripts run unchanged: each vendored argv is dry-run by pretrain_gpt.main.

The argv and DeepSpeed JSON are what bash produced from the upstream scripts (tests/upstream/examples,
tools/upstream_examples.py); only the user's files are swapped for this run's (`localize`: synthetic data,
tiny tokenizers, a scratch directory), on the scripts' machine: one node of 8 GPUs (WORLD_SIZE=8). Scripts
that need tensor or pipeline parallelism must fail with the named error, which is their correct outcome here.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import pretrain_gpt
from tests.upstream.scripts import (
    EXAMPLES,
    TP_PP_ERROR,
    drop_flag,
    get_flag,
    load_example,
    localize,
    scale_down,
    set_flag,
    write_tokenizer_files,
)

NEEDS_TP_PP = {"ds_pretrain_gpt_125M", "pretrain_llama2_distributed"}
WORKS = [n for n in EXAMPLES if n not in NEEDS_TP_PP]  # every other upstream example runs
assert set(EXAMPLES) == set(WORKS) | NEEDS_TP_PP, EXAMPLES


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tokenizer_files(str(tmp_path_factory.mktemp("tokenizers")))


@pytest.fixture
def dry_run(monkeypatch, capsys, tmp_path, files):
    """dry_run(argv, world=8) -> (exit code, stdout, stderr) of `pretrain_gpt.main(argv + ['--dry-run'])`."""
    import torch.distributed as dist

    def run(argv, world=8, ds_config=None):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("GPUS_PER_NODE", str(min(world, 8)))
        if dist.is_available() and dist.is_initialized():  # another test's group must not decide the world size
            monkeypatch.setattr("megatron.arguments.world_size_from_env", lambda: world)
        rc = pretrain_gpt.main(localize(argv, ds_config, str(tmp_path), files) + ["--dry-run"])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def _example(name):
    ex = load_example(name)
    return ex["argv"], ex["ds_config"]


@pytest.mark.parametrize("name", WORKS)
def test_script_dry_runs_unchanged(name, dry_run):
    argv, ds_config = _example(name)
    rc, out, err = dry_run(argv, ds_config=ds_config)
    assert rc == 0, err
    assert "DRY RUN: configuration is valid" in out


@pytest.mark.parametrize("name", sorted(NEEDS_TP_PP))
def test_script_needing_tensor_or_pipeline_parallelism_is_refused_by_name(name, dry_run):
    argv, ds_config = _example(name)
    assert int(get_flag(argv, "--tensor-model-parallel-size")) > 1
    rc, _, err = dry_run(argv, ds_config=ds_config)
    assert rc == 2 and TP_PP_ERROR in err and "--ds-sequence-parallel-size" in err


@pytest.mark.parametrize("name", sorted(NEEDS_TP_PP))
def test_everything_but_tensor_and_pipeline_parallelism_is_accepted(name, dry_run):
    argv, ds_config = _example(name)
    argv = set_flag(set_flag(argv, "--tensor-model-parallel-size", 1), "--pipeline-model-parallel-size", 1)
    rc, out, err = dry_run(argv, ds_config=ds_config)
    assert rc == 0, err


def test_fpdt_script_dry_runs_unchanged(dry_run):
    argv, ds_config = _example("ds_pretrain_gpt_6.7B_fpdt_32k")
    rc, out, err = dry_run(argv, ds_config=ds_config)
    assert rc == 0, err
    assert "precision fp16 | attention flash-attn | recompute full" in out  # --use-flash-attn-v2, checkpointing


def test_upstream_meaning_of_the_sequence_parallel_example(dry_run):
    argv, ds_config = _example("ds_pretrain_gpt_1.3B_seq_parallel_32k")
    rc, out, err = dry_run(argv, ds_config=ds_config)
    assert rc == 0, err
    for needle in ("data parallel 2 x sequence parallel (Ulysses) 4", "ZeRO stage 1", "precision fp16",
                   "attention triton | recompute full", "global 2 sequences of 32768 tokens",
                   "gradients clipped at global norm 1.0",
                   "fp16 dynamic loss scaling from 2^11, doubled after 500 overflow-free steps, halved after 2"):
        assert needle in out, needle


def test_upstream_meaning_of_the_deepspeed_example(dry_run):
    argv, ds_config = _example("run_deepspeed_example")
    rc, out, err = dry_run(argv, ds_config=ds_config)
    assert rc == 0, err
    for needle in ("batch: micro 4 x accumulation 32 x dp 8 = global 1024",  # --global-batch-size, not the JSON's 64
                   "train_batch_size 64 ignored under --deepspeed",
                   "--loss-scale 12.0: ignored under --deepspeed",  # DeepSpeed ignores Megatron's static scale
                   "fp16 dynamic loss scaling from 2^12",
                   "--clip-grad 1.0: ignored under --deepspeed", "gradients are not clipped"):
        assert needle in out, needle


# ------------------------------------------------------------------ argv rewriting helpers

def test_localize_swaps_only_the_users_files(tmp_path, files):
    argv, ds_config = _example("pretrain_llama2_distributed")
    out = localize(argv, ds_config, str(tmp_path), files)
    assert get_flag(out, "--data-path") is None and get_flag(out, "--mock-data") is True
    assert get_flag(out, "--tokenizer-model") == files["tokenizer_model"]
    assert get_flag(out, "--save").startswith(str(tmp_path))
    assert os.path.isfile(get_flag(out, "--deepspeed_config"))
    changed = {"--data-path", "--mock-data", "--tokenizer-model", "--save", "--load", "--deepspeed_config"}
    assert _flags_and_values(out, changed) == _flags_and_values(argv, changed)


def _flags_and_values(argv, ignore) -> list:
    names = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return [(n, get_flag(argv, n)) for n in names if n not in ignore]


@pytest.mark.parametrize("name", EXAMPLES)
def test_scale_down_keeps_every_other_flag(name):
    argv, _ = _example(name)
    small = scale_down(argv)
    assert (get_flag(small, "--num-layers"), get_flag(small, "--hidden-size"), get_flag(small, "--seq-length")) == \
        ("2", "64", "64")
    assert get_flag(small, "--ds-sequence-parallel-size") == "2" and get_flag(small, "--train-iters") == "3"
    assert get_flag(small, "--train-samples") is None and get_flag(small, "--train-tokens") is None
    sized = {"--num-layers", "--hidden-size", "--num-attention-heads", "--num-key-value-heads", "--ffn-hidden-size",
             "--seq-length", "--max-position-embeddings", "--ds-sequence-parallel-size", "--micro-batch-size",
             "--global-batch-size", "--train-iters", "--train-samples", "--train-tokens", "--lr-warmup-iters",
             "--lr-decay-iters"}
    assert _flags_and_values(small, sized) == _flags_and_values(argv, sized)
    if get_flag(argv, "--lr-warmup-iters") is not None:  # iteration schedules shrink with the run, same shape
        old = int(get_flag(argv, "--lr-warmup-iters")) / int(get_flag(argv, "--train-iters"))
        assert int(get_flag(small, "--lr-warmup-iters")) == int(old * 3)
    if get_flag(argv, "--num-key-value-heads") is not None:  # llama2: 16 heads / 4 K/V heads -> 4 / 1
        assert get_flag(small, "--num-key-value-heads") == "1" and get_flag(small, "--ffn-hidden-size") == "172"


@pytest.mark.parametrize("name", WORKS)
def test_scaled_down_script_is_valid_at_sp_2(name, dry_run):
    argv, ds_config = _example(name)
    rc, out, err = dry_run(scale_down(argv), world=2, ds_config=ds_config)
    assert rc == 0, err
    assert "data parallel 1 x sequence parallel (Ulysses) 2" in out and "2 layers, hidden 64, 4 heads" in out


def test_flag_editing_handles_inline_values_and_lists():
    argv = ["--data-path", "1", "a", "0.5", "b", "--zero-stage=2", "--fp16", "--lr", "-1e-3"]
    assert get_flag(argv, "--data-path") == ["1", "a", "0.5", "b"] and get_flag(argv, "--zero-stage") == "2"
    assert get_flag(argv, "--fp16") is True and get_flag(argv, "--lr") == "-1e-3"
    assert set_flag(argv, "--zero-stage", 3)[5:7] == ["--zero-stage", "3"]
    assert drop_flag(argv, "--data-path") == ["--zero-stage=2", "--fp16", "--lr", "-1e-3"]


# ------------------------------------------------------------------ the vendored data is what upstream produces

UPSTREAM_GIT = os.environ.get("UPSTREAM_MEGATRON_DEEPSPEED_GIT", "/work/.mirror/microsoft+Megatron-DeepSpeed/repo")


@pytest.mark.skipif(not os.path.isdir(UPSTREAM_GIT), reason="no local Megatron-DeepSpeed git copy "
                    "(set UPSTREAM_MEGATRON_DEEPSPEED_GIT to regenerate the vendored data)")
def test_vendored_examples_match_a_fresh_expansion(tmp_path):
    import json

    from tools.upstream_examples import EXAMPLES as SCRIPTS
    from tools.upstream_examples import expand

    for name in SCRIPTS:
        vendored = load_example(name)
        fresh = expand(UPSTREAM_GIT, vendored["source"]["commit"], name)
        assert json.loads(json.dumps(fresh)) == vendored, name


@pytest.mark.skipif(not os.path.isdir(UPSTREAM_GIT), reason="no local Megatron-DeepSpeed git copy")
def test_inventory_matches_a_fresh_extraction():
    import json

    from tools.upstream_flags import dumps, inventory

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "upstream_flags.json")) as f:
        committed = f.read()
    sources = json.loads(committed)["sources"]
    ds_git = UPSTREAM_GIT.replace("Megatron-DeepSpeed", "DeepSpeed")
    if not os.path.isdir(ds_git):
        pytest.skip("no local DeepSpeed git copy")
    fresh = inventory(UPSTREAM_GIT, sources["megatron-deepspeed"]["commit"], ds_git, sources["deepspeed"]["commit"])
    assert dumps(fresh) == committed


def test_expansion_tool_runs_bash_with_stand_ins(tmp_path):
    """The expansion mechanism itself (runs everywhere): a script in upstream's style, expanded by bash."""
    repo = tmp_path / "repo"
    script = repo / "examples_deepspeed" / "tiny.sh"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/bash\nn=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)\n'
                      'cat <<EOT > ds.json\n{"train_batch_size": $((n * 2))}\nEOT\n'
                      'deepspeed ${PWD}/../pretrain_gpt.py --num-layers 2 --deepspeed_config ds.json '
                      '--tensorboard-dir tb_$(date +%s) 2>&1 | tee log.txt\n')
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    from tools import upstream_examples as ue

    ue.EXAMPLES["tiny"] = ("examples_deepspeed/tiny.sh", [], [], None)
    try:
        out = ue.expand(str(repo), "HEAD", "tiny")
    finally:
        del ue.EXAMPLES["tiny"]
    assert out["argv"] == ["--num-layers", "2", "--deepspeed_config", "ds.json", "--tensorboard-dir",
                           "tb_2024.01.01_00.00.00"]
    assert out["ds_config"] == {"train_batch_size": 16} and out["launcher"] == ["deepspeed"]
