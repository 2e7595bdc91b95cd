"""Every Megatron-DeepSpeed flag is implemented, accepted with a note, or refused by name: never "unrecognized".

The inventory (tests/upstream/upstream_flags.json) is generated from upstream's arguments.py by
tools/upstream_flags.py; these tests hold the parser and megatron/upstream_compat.py to it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from megatron import upstream_compat as uc
from megatron.arguments import build_parser, parse_args
from megatron.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "upstream_flags.json")) as _f:
    INVENTORY = json.load(_f)
UPSTREAM = INVENTORY["flags"]

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --lr 1e-3 "
        "--train-iters 10 --mock-data --vocab-size 100").split()


def cfg(extra=(), world=1, **kw):
    return parse_args(BASE + list(extra), world_size=world, padded_vocab_size=128, **kw)


def error(extra=(), world=1, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(extra, world, **kw)
    return str(e.value)


def _upstream_arity(rec) -> object:
    return 0 if rec["action"] in ("store_true", "store_false") else rec["nargs"]


def test_every_upstream_flag_is_known_with_upstream_arity():
    actions = build_parser()._option_string_actions
    missing = [f for rec in UPSTREAM for f in rec["flags"] if f not in actions]
    assert not missing, f"upstream flags the parser does not know: {missing}"
    wrong = [(f, _upstream_arity(rec), actions[f].nargs) for rec in UPSTREAM for f in rec["flags"]
             if actions[f].nargs != _upstream_arity(rec)]
    assert not wrong, f"(flag, upstream nargs, ours): {wrong}"


def test_every_upstream_flag_is_classified():
    statuses = {uc.IMPLEMENTED, uc.NO_EFFECT, uc.REJECTED, uc.NOT_YET}
    for rec in UPSTREAM:
        for flag in rec["flags"]:
            status, why = uc.classify(flag)
            assert status in statuses, flag
            assert status == uc.IMPLEMENTED or why, f"{flag} is {status} without a reason"
    # the refused values of a REJECTED flag: upstream's default is always accepted (same meaning)
    by_flag = {f: rec for rec in UPSTREAM for f in rec["flags"]}
    for c in uc.FLAGS:
        if c.status == uc.REJECTED and c.nargs != 0 and c.name in by_flag:
            assert c.default == by_flag[c.name]["default"], c.name


def test_compat_table_has_no_duplicates_and_no_implemented_flags():
    flags = [f for c in uc.FLAGS for f in c.flags]
    assert len(flags) == len(set(flags))
    assert not set(flags) & set(uc.PARTIAL)


def _non_default(c: uc.CompatFlag) -> list:
    if c.nargs == 0:
        return [c.name]
    value = {int: "7", float: "0.5"}.get(c.type, "x")
    return [c.name, value] + ([value] if c.nargs == "+" and c.default == [1] else [])


@pytest.mark.parametrize("c", [c for c in uc.FLAGS if c.status == uc.NO_EFFECT], ids=lambda c: c.name)
def test_no_effect_flags_print_a_note(c):
    notes = cfg(_non_default(c)).notes
    assert any(n.startswith(f"{c.name}: accepted, no effect (") for n in notes), notes


@pytest.mark.parametrize("c", [c for c in uc.FLAGS if c.status == uc.REJECTED], ids=lambda c: c.name)
def test_rejected_flags_name_the_flag_and_the_alternative(c):
    msg = error(_non_default(c))
    assert c.name in msg and c.why in msg
    if c.nargs != 0 and c.type is not bool:  # upstream's default means the same here: accepted silently
        default = c.default if isinstance(c.default, list) else [c.default]
        if None not in default:
            cfg([c.name, *map(str, default)])


def test_all_refusals_in_one_message():
    msg = error(["--fp8-hybrid", "--num-experts", "8", "--kd"])
    assert msg.startswith("these Megatron-DeepSpeed flags are not supported")
    assert all(f in msg for f in ("--fp8-hybrid", "--num-experts 8", "--kd"))


# ------------------------------------------------------------------ the product issue's must-accept list

def test_tokenizer_type_defaults_to_gpt2_bpe(tmp_path):
    from tests.upstream.scripts import write_tokenizer_files

    files = write_tokenizer_files(str(tmp_path))
    base = [a for a in BASE if a not in ("--mock-data", "--vocab-size", "100")]
    c = parse_args(base + ["--data-path", "corpus_text_document", "--vocab-file", files["vocab_file"],
                           "--merge-file", files["merge_file"]], world_size=1)
    assert c.data.tokenizer_type == "GPT2BPETokenizer"
    assert c.model.vocab_size == 384  # 260 tokens padded to a multiple of 128
    # synthetic data with only a vocabulary size keeps the NullTokenizer
    assert cfg().data.tokenizer_type == "NullTokenizer"


def test_hf_tokenizer_is_upstream_name_for_huggingface(tmp_path):
    from tests.upstream.scripts import write_tokenizer_files

    files = write_tokenizer_files(str(tmp_path))
    c = parse_args(BASE + ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", files["hf_tokenizer"]],
                   world_size=1)
    assert c.data.tokenizer_type == "HuggingFaceTokenizer" and c.model.vocab_size == 384
    assert "BERT WordPiece tokenizers are not supported" in error(["--tokenizer-type", "BertWordPieceLowerCase"])


def test_rotary_theta_alias():
    c = cfg(["--use-rotary-position-embeddings", "--rotary-position-embeddings-theta", "100000000"])
    assert c.model.position_embedding_type == "rope" and c.model.rotary_base == 1e8


def test_flash_attention_v1_and_builder_select_flash_attn_with_a_note():
    for flag in ("--use-flash-attn-v1", "--use-flash-attn", "--use-flash-attn-builder"):
        c = cfg([flag, "--bf16"], check_environment=False)  # flash-attn kernels take bf16/fp16 only
        assert c.parallel.attention_backend == "flash-attn", flag
        assert any("FlashAttention" in n and "same exact attention" in n for n in c.notes), flag
    assert "choose different kernels" in error(["--use-flash-attn-v1", "--use-flash-attn-triton"],
                                               check_environment=False)


def test_upstream_aliases_and_switches():
    base = BASE[2:6] + BASE[8:]  # without --num-layers 2 and --seq-length 64
    assert "--num-layers" not in base and "--seq-length" not in base and "--hidden-size" in base
    c = parse_args(base + ["--encoder-num-layers", "3", "--encoder-seq-length", "32"], world_size=1,
                   padded_vocab_size=128)
    assert (c.model.num_layers, c.data.seq_length) == (3, 32)
    assert "name the same thing and disagree" in error(["--encoder-num-layers", "3"])
    assert cfg(["--no-position-embedding"]).model.position_embedding_type == "none"
    assert cfg(["--no-position-embedding", "--use-rotary-position-embeddings"]).model.position_embedding_type == "rope"
    assert cfg(["--deepscale"]).notes  # DeepSpeed's old name for --deepspeed
    assert cfg(["--loss-scale-window", "500.0"]).optim.loss_scale_window == 500  # upstream parses a float
    # upstream's default --lr-warmup-iters 0 next to --lr-warmup-fraction is not a conflict
    assert cfg(["--lr-warmup-iters", "0", "--lr-warmup-fraction", "0.2"]).optim.lr_warmup_steps == 2
    assert "--optimizer sgd is not implemented" in error(["--optimizer", "sgd"])
    assert "--distributed-backend hccl" in error(["--distributed-backend", "hccl"])


def test_exit_on_missing_checkpoint(tmp_path):
    msg = error(["--load", str(tmp_path), "--exit-on-missing-checkpoint"])
    assert "--exit-on-missing-checkpoint" in msg and "holds no checkpoint" in msg
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    assert cfg(["--load", str(tmp_path), "--exit-on-missing-checkpoint"]).checkpoint.load == str(tmp_path)


def test_unknown_flags_suggest_the_closest_one():
    msg = error(["--num-layer", "2"])
    assert "unknown flag --num-layer; did you mean --num-layers?" in msg and "unexpected value" not in msg
    assert "unexpected value 'x'" in error(["--fp16", "x"])
    assert "docs/flags.md" in error(["--no-such-flag-at-all"])
    assert "did you mean --use-flash-attn-v2" in error(["--use-flash-atn-v2"])


def test_command_line_error_is_one_line_without_traceback():
    root = os.path.dirname(os.path.dirname(HERE))
    proc = subprocess.run([os.sys.executable, "pretrain_gpt.py", *BASE, "--kd", "--dry-run"], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert "pretrain_gpt.py: error: this Megatron-DeepSpeed flag is not supported:\n  --kd: knowledge" in proc.stderr
    assert "Traceback" not in proc.stderr
