"""Bad inputs through the real command line, in-process: `pretrain_gpt.main(argv)` and
`tools/preprocess_data.main(argv)`, exactly what `python pretrain_gpt.py ...` runs (torchrun's
extra layer, the once-per-job printing across ranks, parent death and rank loss are in
test_jobs.py, which needs real processes).

Each case: the flags, a fragment the message must contain, the exit code. Every case checks
that the message is printed once, on the `pretrain_gpt.py: error:` line, and that nothing
prints a traceback. Cases that fail while the flags and files are validated cost milliseconds;
those that fail while the datasets are built (after a one-rank gloo process group started, as
in a real run) a fraction of a second.
"""

from __future__ import annotations

import gzip
import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist

import pretrain_gpt
from tests.cli.conftest import VOCAB, write_dataset
from tools import preprocess_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 32 --micro-batch-size 1 "
         "--global-batch-size 1 --train-iters 2 --lr 1e-3 --eval-iters 0 --log-interval 1 --hidden-dropout 0 "
         "--attention-dropout 0")
MOCK = MODEL + f" --mock-data --vocab-size {VOCAB}"
DATA = MODEL + f" --tokenizer-type NullTokenizer --vocab-size {VOCAB} --data-path {{good}}"
NULL = MODEL + f" --tokenizer-type NullTokenizer --vocab-size {VOCAB}"


@dataclass
class Case:
    id: str
    args: str  # formatted with the data prefixes, tokenizer files and a scratch directory
    needle: str
    code: int = 2


CASES = [
    # ---------------------------------------------------------------- flags
    Case("adam_beta1_1.5", MOCK + " --adam-beta1 1.5", "--adam-beta1 must be in [0, 1), got 1.5"),
    Case("adam_beta2_nan", MOCK + " --adam-beta2 nan", "--adam-beta2 must be in [0, 1), got nan"),
    Case("adam_eps_negative", MOCK + " --adam-eps -1e-8", "--adam-eps must be >= 0, got -1e-08"),
    Case("init_method_std_negative", MOCK + " --init-method-std -0.02", "--init-method-std must be >= 0, got -0.02"),
    Case("weight_decay_negative", MOCK + " --weight-decay -0.1", "--weight-decay must be >= 0"),
    Case("loss_scale_negative", MOCK + " --fp16 --loss-scale -8", "--loss-scale must be positive, got -8.0"),
    Case("loss_scale_zero", MOCK + " --loss-scale 0", "--loss-scale must be positive, got 0.0"),
    Case("lr_negative", MOCK.replace("--lr 1e-3", "--lr -1e-3"), "--lr must be >= 0"),
    Case("clip_grad_negative", MOCK + " --clip-grad -1", "--clip-grad must be >= 0"),
    Case("timeout_negative", MOCK + " --distributed-timeout-minutes -1",
         "--distributed-timeout-minutes must be positive, got -1.0"),
    Case("seq_length_negative", MOCK.replace("--seq-length 32", "--seq-length -32"),
         "--seq-length must be positive, got -32"),
    Case("global_batch_zero", MOCK.replace("--global-batch-size 1", "--global-batch-size 0"),
         "--global-batch-size must be >= 1"),
    Case("mock_data_and_data_path", DATA + " --mock-data", "--mock-data and --data-path both given"),
    Case("fp16_and_bf16", MOCK + " --fp16 --bf16", "--fp16 and --bf16 are mutually exclusive"),
    Case("not_a_number", MOCK + " --micro-batch-size two", "argument --micro-batch-size: invalid int value: 'two'"),
    Case("unknown_flag", MOCK + " --no-such-flag", "--no-such-flag"),
    Case("missing_required", "--num-layers 2", "--hidden-size is required"),
    Case("bad_split", DATA + " --split a,b", "--split 'a,b' must be numbers"),
    Case("negative_split", DATA + " --split 90,-10,0", "must be non-negative with a positive sum"),
    # ---------------------------------------------------------------- data files (before the process group)
    Case("prefix_missing", NULL + " --data-path {dir}/nothing", "index file {dir}/nothing.idx of dataset prefix"),
    Case("prefix_with_bin", NULL + " --data-path {good}.bin", "pass the prefix without the extension"),
    Case("prefix_is_directory", NULL + " --data-path {dir}", "is a directory; pass the path of a .bin/.idx pair"),
    Case("bin_missing", NULL + " --data-path {no_bin}", "data file {no_bin}.bin of dataset prefix"),
    Case("idx_header_truncated", NULL + " --data-path {idx_header_cut}", "shorter than the 34-byte header"),
    Case("idx_truncated", NULL + " --data-path {idx_cut}", "{idx_cut}.idx is truncated"),
    Case("idx_too_long", NULL + " --data-path {idx_long}", "{idx_long}.idx is longer than its header says"),
    Case("bad_magic", NULL + " --data-path {bad_magic}", "is not a Megatron mmap index"),
    Case("bad_version", NULL + " --data-path {bad_version}", "has index version 7"),
    Case("bad_dtype", NULL + " --data-path {bad_dtype}", "has unknown dtype code 99"),
    Case("legacy_format", NULL + " --data-path {legacy}", "legacy 'lazy/cached' IndexedDataset"),
    Case("bin_truncated", NULL + " --data-path {bin_cut}", "the .bin is truncated"),
    Case("bin_idx_mismatch", NULL + " --data-path {mixed_pair}", "the pair comes from different runs"),
    Case("negative_length", NULL + " --data-path {negative_size}", "negative sequence lengths"),
    Case("bad_doc_index_end", NULL + " --data-path {bad_doc_end}", "document indices must rise from 0"),
    Case("empty_dataset", NULL + " --data-path {empty}", "holds no tokens"),
    Case("blend_odd_count", NULL + " --data-path 0.5 {good} {tiny}", "must alternate weight and prefix"),
    Case("blend_no_weights", NULL + " --data-path {good} {tiny}", "is not a weight"),
    Case("blend_negative_weight", NULL + " --data-path -1 {good} 2 {tiny}", "-1.0 is not a finite non-negative"),
    Case("blend_zero_weights", NULL + " --data-path 0 {good} 0 {tiny}", "they sum to 0"),
    Case("blend_nan_weight", NULL + " --data-path nan {good} 1 {tiny}", "nan is not a finite non-negative"),
    Case("blend_missing_prefix", NULL + " --data-path 0.5 {good} 0.5 {dir}/gone", "{dir}/gone.idx"),
    # ---------------------------------------------------------------- data (while the datasets are built)
    Case("bin_longer_than_index", NULL + " --data-path {bin_long}", "the .bin is longer than its index"),
    Case("bad_pointers", NULL + " --data-path {bad_pointers}", "sequence pointers do not match"),
    Case("bad_doc_index_order", NULL + " --data-path {bad_doc_order}", "document indices must rise from 0"),
    Case("train_split_empty", DATA + " --split 0,100,0", "the train split of --data-path {good} is empty"),
    Case("blend_split_empty", NULL + " --data-path 0.5 {good} 0.5 {tiny} --split 50,50,0 --eval-iters 1",
         "every blended dataset needs documents in each split"),
    Case("token_ids_above_vocab", NULL.replace(f"--vocab-size {VOCAB}", "--vocab-size 50")
         + " --make-vocab-size-divisible-by 1 --data-path {good}",
         "holds token id 100 (largest id 100 in"),
    Case("token_ids_wrong_tokenizer", NULL + " --data-path {wide}", "is >= the model's vocabulary size 101"),
    # ---------------------------------------------------------------- tokenizers
    Case("gpt2_vocab_not_json", MODEL + " --data-path {good} --vocab-file {not_json} --merge-file {merge_file}",
         "is not a GPT-2 vocab.json"),
    Case("gpt2_vocab_missing", MODEL + " --data-path {good} --merge-file {merge_file}",
         "--tokenizer-type GPT2BPETokenizer needs --vocab-file"),
    Case("gpt2_vocab_is_directory", MODEL + " --data-path {good} --vocab-file {tokdir} --merge-file {merge_file}",
         "--vocab-file {tokdir} is a directory"),
    Case("gpt2_merges_garbage", MODEL + " --data-path {good} --vocab-file {vocab_file} --merge-file {vocab_file}",
         "do not load as a GPT-2 BPE tokenizer"),
    Case("sentencepiece_not_a_model", MODEL + " --data-path {good} --tokenizer-type GPTSentencePieceTokenizer "
         "--tokenizer-model {vocab_file}", "is not a SentencePiece model"),
    Case("hf_tokenizer_missing", MODEL + " --data-path {good} --tokenizer-type HFTokenizer --tokenizer-model "
         "{dir}/none.json", "no tokenizer.json there"),
    # ---------------------------------------------------------------- checkpoints
    Case("load_missing", MOCK + " --load {scratch}/no-such-run", "--load {scratch}/no-such-run: no such directory"),
    Case("exit_on_missing_checkpoint", MOCK + " --load {scratch} --exit-on-missing-checkpoint",
         "holds no checkpoint"),
    Case("finetune_without_load", MOCK + " --finetune", "--finetune loads weights from --load"),
    Case("load_is_a_file", MOCK + " --load {scratch}/a-file", "--load {scratch}/a-file is a file"),
    Case("checkpoint_tracker_garbage", MOCK + " --load {scratch}/ck_garbage",
         "{scratch}/ck_garbage/latest_checkpointed_iteration.txt must hold an iteration number"),
    Case("checkpoint_iteration_missing", MOCK + " --load {scratch}/ck_missing",
         "names iteration 7, but {scratch}/ck_missing/iter_0000007 is missing"),
    # ---------------------------------------------------------------- outputs
    Case("save_under_a_file", MOCK + " --save {scratch}/a-file/ck", "{scratch}/a-file is a file"),
    Case("save_is_a_file", MOCK + " --save {scratch}/a-file", "--save {scratch}/a-file is a file, not a directory"),
    Case("tensorboard_under_a_file", MOCK + " --tensorboard-dir {scratch}/a-file/tb", "{scratch}/a-file is a file"),
    Case("log_json_under_a_file", MOCK + " --log-json {scratch}/a-file/log.jsonl", "{scratch}/a-file is a file"),
    Case("log_json_is_a_directory", MOCK + " --log-json {scratch}", "--log-json {scratch} is a directory"),
    Case("outputs_that_exist_are_fine", DATA + " --split 0,100,0 --save {scratch} --tensorboard-dir {scratch} "
         "--log-json {scratch}/log.jsonl", "the train split of --data-path {good} is empty"),
]


@pytest.fixture(scope="module")
def paths(data, tokenizer_files, tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("cli_scratch")
    (scratch / "a-file").write_text("not a directory\n")
    for name, tracker in (("ck_garbage", "garbage\n"), ("ck_missing", "7\n")):
        (scratch / name).mkdir()
        (scratch / name / "latest_checkpointed_iteration.txt").write_text(tracker)
    return {**data, **{k: v for k, v in tokenizer_files.items() if k != "dir"}, "tokdir": tokenizer_files["dir"],
            "scratch": str(scratch)}


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(argv) -> (exit code, stdout, stderr) of pretrain_gpt.main in this process, as a one-rank job."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    assert not dist.is_initialized()

    def run(argv: list) -> tuple:
        rc = pretrain_gpt.main(argv)
        assert not dist.is_initialized(), "main() must not leave its process group behind"
        out = capsys.readouterr()
        return rc, out.out, out.err

    yield run
    torch.set_num_threads(threads)  # a run sets one thread per rank


def assert_one_clean_message(out: str, err: str, needle: str, prog: str = "pretrain_gpt.py") -> None:
    assert "Traceback" not in out + err, out + err
    assert (out + err).count(needle) == 1, f"expected {needle!r} once in:\n{out}{err}"
    line = next(ln for ln in err.splitlines() if needle in ln)
    assert line.startswith(f"{prog}: error: "), line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error(case, paths, cli):
    needle = case.needle.format(**paths)
    rc, out, err = cli(case.args.format(**paths).split())
    assert rc == case.code, out + err
    assert_one_clean_message(out, err, needle)


def test_every_brief_case_is_in_the_table():
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)
    for needed in ("adam_beta1_1.5", "adam_eps_negative", "init_method_std_negative", "weight_decay_negative",
                   "loss_scale_negative", "timeout_negative", "seq_length_negative", "mock_data_and_data_path",
                   "empty_dataset", "blend_odd_count", "blend_no_weights", "blend_negative_weight",
                   "blend_zero_weights", "blend_nan_weight", "prefix_with_bin", "prefix_is_directory",
                   "bin_idx_mismatch", "token_ids_above_vocab", "gpt2_vocab_not_json", "save_under_a_file",
                   "tensorboard_under_a_file", "log_json_under_a_file"):
        assert needed in ids, needed


def test_dry_run_reports_a_bad_flag_once(cli):
    rc, out, err = cli((MOCK + " --adam-beta1 1.5 --dry-run").split())
    assert rc == 2
    assert_one_clean_message(out, err, "--adam-beta1 must be in [0, 1)")


def test_lr_zero_is_warned(cli):
    rc, out, err = cli((MOCK.replace("--lr 1e-3", "--lr 0") + " --dry-run").split())
    assert rc == 0 and "WARNING: --lr 0: the weights never change" in out


def test_a_damaged_index_cache_is_rebuilt_with_a_warning(cli, data, tmp_path):
    """A truncated .npy of the index cache (a killed job, a full disk) is rebuilt, not fatal."""
    prefix = str(tmp_path / "d")
    for ext in (".bin", ".idx"):
        shutil.copyfile(data["good"] + ext, prefix + ext)
    argv = (NULL + f" --data-path {prefix} --train-iters 1").split()
    rc, out, err = cli(argv)
    assert rc == 0, out + err
    caches = sorted(p for p in os.listdir(tmp_path) if p.endswith("_shuffle_idx.npy"))
    assert caches, os.listdir(tmp_path)
    os.truncate(tmp_path / caches[0], 5)
    rc, out, err = cli(argv)
    assert rc == 0, out + err
    assert f"index cache file {tmp_path / caches[0]} is damaged" in err and "rebuilding it" in err
    assert "Traceback" not in out + err
    rc, out, err = cli(argv)  # and the rebuilt file is good
    assert rc == 0 and "damaged" not in err


def test_a_bad_token_id_is_caught_in_the_batch(data, tmp_path):
    """Where the sample of the ids taken at build time misses a bad id, the batch check sees it
    before the model does (on the host: no device-side assert, no sync)."""
    from megatron.data.checks import TokenIdError
    from megatron.data.gpt_dataset import build_train_valid_test_datasets
    from megatron.data.sharding import get_sp_batch

    docs = [[1, 2, 3, 4, 5, 6, 7, 8, VOCAB]] * 8
    docs[3] = [1, 2, 3, 999, 5, 6, 7, 8, VOCAB]
    prefix = write_dataset(str(tmp_path / "one_bad"), docs)
    train, _, _ = build_train_valid_test_datasets(prefix, "100,0,0", 8, (8, 0, 0), 1)
    bad = next(i for i in range(len(train)) if 999 in train[i]["text"])
    get_sp_batch(train, [(bad + 1) % len(train)], 8, 0, 1, VOCAB, vocab_size=128)  # a good one passes
    with pytest.raises(TokenIdError) as e:
        get_sp_batch(train, [bad], 8, 0, 1, VOCAB, vocab_size=128)
    msg = str(e.value)
    assert f"sample {bad} of the train split of {prefix!r}" in msg and "holds token id 999" in msg
    assert "vocabulary size 128" in msg
    with pytest.raises(TokenIdError, match="holds token id 999"):  # and the sample at build time sees it
        build_train_valid_test_datasets(prefix, "100,0,0", 8, (8, 0, 0), 1, vocab_size=128)


def test_a_programming_error_keeps_its_traceback(cli, monkeypatch):
    def broken(cfg, parallel_state):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(importlib.import_module("megatron.training.pretrain"), "default_model_provider", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        pretrain_gpt.main(MOCK.split())
    assert not dist.is_initialized()


def test_read_only_file_system(paths, tmp_path):
    """--save, --tensorboard-dir, --log-json on a read-only mount (a tmpfs mounted ro in a private
    mount namespace; one process checks all three through main(), as --preflight does)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private mount namespace here: {probe.stderr.decode()[-200:]}")
    code = ("import sys, pretrain_gpt\n"
            "base = sys.argv[1].split()\n"
            "for extra in sys.argv[2:]:\n"
            "    print('rc', pretrain_gpt.main(base + extra.split() + ['--preflight']), flush=True)\n")
    flags = [f"--save {ro}/ck", f"--tensorboard-dir {ro}/tb", f"--log-json {ro}/log.jsonl"]
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"', "sh",
                           sys.executable, "-c", code, MOCK, *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["rc", "2"] * 3, proc.stdout + proc.stderr
    for flag in flags:
        name, path = flag.split()
        needle = f"{name} {path}: cannot write to {ro} (Read-only file system)"
        assert_one_clean_message(proc.stdout, proc.stderr, needle)


# ---------------------------------------------------------------------- tools/preprocess_data.py

PRE = "--tokenizer-type NullTokenizer --vocab-size 100 --append-eod --log-interval 0"


@pytest.fixture(scope="module")
def pre_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli_pre")
    good = d / "in.jsonl"
    good.write_text("".join('{"text": "1 2 3"}\n' for _ in range(50)))
    raw = gzip.compress(good.read_bytes())
    (d / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])  # a truncated download
    (d / "garbled.jsonl.gz").write_bytes(raw[:10] + bytes(range(256)) * 4)  # gzip magic, garbage after
    (d / "a-file").write_text("x")
    return {"dir": str(d), "good": str(good), "cut": str(d / "cut.jsonl.gz"),
            "garbled": str(d / "garbled.jsonl.gz")}


PRE_CASES = [
    Case("gz_truncated", "--input {cut} --output-prefix {dir}/out/a " + PRE, "{cut}: cannot read it", 1),
    Case("gz_garbled", "--input {garbled} --output-prefix {dir}/out/b " + PRE, "{garbled}: cannot read it", 1),
    Case("input_is_directory", "--input {dir} --output-prefix {dir}/out/c " + PRE,
         "--input {dir} is a directory; pass one JSONL file", 1),
    Case("input_missing", "--input {dir}/none.jsonl --output-prefix {dir}/out/d " + PRE,
         "--input {dir}/none.jsonl does not exist", 1),
    Case("output_under_a_file", "--input {good} --output-prefix {dir}/a-file/out " + PRE,
         "--output-prefix {dir}/a-file/out: {dir}/a-file is a file", 1),
    Case("vocab_not_json", "--input {good} --output-prefix {dir}/out/e --tokenizer-type GPT2BPETokenizer "
         "--vocab-file {dir}/a-file --merge-file {dir}/a-file", "--vocab-file {dir}/a-file is not a GPT-2 vocab.json", 1),
]


@pytest.mark.parametrize("case", PRE_CASES, ids=[c.id for c in PRE_CASES])
def test_preprocess_error(case, pre_files, capsys):
    rc = preprocess_data.main(case.args.format(**pre_files).split())
    out = capsys.readouterr()
    assert rc == case.code, out.out + out.err
    needle = case.needle.format(**pre_files)
    assert "Traceback" not in out.out + out.err
    assert out.err.count(needle) == 1 and f"error: {needle}" in out.err, out.err
    leftovers = [n for n in os.listdir(pre_files["dir"] + "/out") if not n.endswith((".bin", ".idx"))] \
        if os.path.isdir(pre_files["dir"] + "/out") else []
    assert not leftovers, leftovers  # no temporary files left behind


def test_preprocess_gz_works(pre_files, tmp_path):
    """(the good .gz next to the broken ones is read, so the errors above are about the damage)"""
    gz = tmp_path / "ok.jsonl.gz"
    gz.write_bytes(gzip.compress(open(pre_files["good"], "rb").read()))
    assert preprocess_data.main(f"--input {gz} --output-prefix {tmp_path}/ok {PRE}".split()) == 0
    from megatron.data.indexed_dataset import MMapIndexedDataset

    assert np.asarray(MMapIndexedDataset(f"{tmp_path}/ok_text_document").tokens).tolist() == [1, 2, 3, 100] * 50
