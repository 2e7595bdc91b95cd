"""Helpers for the vendored upstream launch scripts (tests/upstream/examples/*.json).

`localize` points an upstream argv at files of this test run (tiny tokenizers, the generated DeepSpeed
JSON, synthetic data, a scratch output directory) and changes nothing else. `scale_down` keeps every flag
of a run but makes it small enough to train on a CPU (for the SP 2 training test that follows the model
restructure).
"""

from __future__ import annotations

import io
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(HERE, "examples")
EXAMPLES = sorted(f[:-5] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".json"))
TP_PP_ERROR = "--tensor-model-parallel-size and --pipeline-model-parallel-size must be 1"

# Flags whose values are files or directories on the upstream user's machine.
_DATA_FLAGS = ("--data-path",)
_FILE_FLAGS = {"--vocab-file": "vocab_file", "--merge-file": "merge_file", "--tokenizer-model": "tokenizer_model"}
_OUTPUT_FLAGS = ("--save", "--load", "--tensorboard-dir", "--wandb-save-dir")


def load_example(name: str) -> dict:
    with open(os.path.join(EXAMPLES_DIR, f"{name}.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ argv editing

def _split(arg: str) -> tuple:
    return tuple(arg.split("=", 1)) if arg.startswith("--") and "=" in arg else (arg, None)


def _values_end(argv: list, i: int) -> int:
    """Index after the values of the flag at i (values: the following arguments that are not flags)."""
    j = i + 1
    while j < len(argv) and not _is_flag(argv[j]):
        j += 1
    return j


def _is_flag(arg: str) -> bool:
    return arg.startswith("--") or (len(arg) == 2 and arg[0] == "-" and arg[1].isalpha())  # "-1" is a value


def get_flag(argv: list, flag: str):
    """The value(s) of `flag`: a string, a list for several values, True for a switch, None if absent."""
    for i, arg in enumerate(argv):
        name, inline = _split(arg)
        if name == flag:
            if inline is not None:
                return inline
            values = argv[i + 1:_values_end(argv, i)]
            return True if not values else values[0] if len(values) == 1 else values
    return None


def drop_flag(argv: list, flag: str) -> list:
    """`argv` without `flag` and its values."""
    out, i = [], 0
    while i < len(argv):
        name, inline = _split(argv[i])
        if name == flag:
            i = i + 1 if inline is not None else _values_end(argv, i)
            continue
        out.append(argv[i])
        i += 1
    return out


def set_flag(argv: list, flag: str, *values) -> list:
    """`argv` with `flag` given `values` (a switch when none), in place of the old ones, else appended."""
    new = [flag, *map(str, values)]
    for i, arg in enumerate(argv):
        if _split(arg)[0] == flag:
            end = i + 1 if _split(arg)[1] is not None else _values_end(argv, i)
            return argv[:i] + new + argv[end:]
    return argv + new


# ------------------------------------------------------------------ tiny tokenizer files

def write_tokenizer_files(directory: str) -> dict:
    """A GPT-2 style byte-level BPE (vocab.json, merges.txt, tokenizer.json) and a SentencePiece model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(byte_symbols)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    files = {"vocab_file": os.path.join(directory, "gpt2-vocab.json"),
             "merge_file": os.path.join(directory, "gpt2-merges.txt"),
             "hf_tokenizer": os.path.join(directory, "tokenizer.json"),
             "tokenizer_model": os.path.join(directory, "tokenizer.model")}
    with open(files["vocab_file"], "w") as f:
        json.dump(vocab, f)
    with open(files["merge_file"], "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(files["hf_tokenizer"])

    import sentencepiece as spm

    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    with open(files["tokenizer_model"], "wb") as f:
        f.write(model.getvalue())
    return files


# ------------------------------------------------------------------ the two rewrites

def localize(argv: list, ds_config: dict | None, workdir: str, files: dict) -> list:
    """The same argv, with the upstream user's files replaced by this run's.

    --data-path becomes --mock-data (synthetic tokens of the configured tokenizer), tokenizer files are the
    tiny ones from `write_tokenizer_files`, output directories move under `workdir`, and --deepspeed_config
    names a copy of the script's generated JSON.
    """
    out = list(argv)
    os.makedirs(workdir, exist_ok=True)
    for flag in _DATA_FLAGS:
        if get_flag(out, flag) is not None:
            out = set_flag(drop_flag(out, flag), "--mock-data")
    for flag, key in _FILE_FLAGS.items():
        if get_flag(out, flag) is not None:
            out = set_flag(out, flag, files[key])
    for flag in _OUTPUT_FLAGS:
        value = get_flag(out, flag)
        if isinstance(value, str):
            out = set_flag(out, flag, os.path.join(workdir, value.lstrip("./")))
    for flag in ("--deepspeed_config", "--deepspeed-config"):
        if get_flag(out, flag) is not None:
            path = os.path.join(workdir, "ds_config.json")
            with open(path, "w") as f:
                json.dump(ds_config, f)
            out = set_flag(out, flag, path)
    return out


def scale_down(argv: list, *, num_layers: int = 2, hidden_size: int = 64, num_attention_heads: int = 4,
               seq_length: int = 64, sp: int = 2, micro_batch_size: int = 1, global_batch_size: int = 2,
               train_iters: int = 3) -> list:
    """The same run at a size a CPU trains in seconds; every flag not about size keeps its value.

    Shape: layers, hidden size, heads (K/V heads keep their ratio to query heads, FFN width its ratio to the
    hidden size), sequence length and position embeddings. Batch: micro and global batch. Length: the run
    stops after `train_iters` iterations (--train-samples/--train-tokens are dropped; iteration-based warmup and
    decay shrink in proportion, so a schedule keeps its shape).
    Parallelism: --ds-sequence-parallel-size `sp`.
    """
    old_hidden = int(get_flag(argv, "--hidden-size"))
    old_heads = int(get_flag(argv, "--num-attention-heads"))
    out = set_flag(argv, "--num-layers", num_layers)
    out = set_flag(out, "--hidden-size", hidden_size)
    out = set_flag(out, "--num-attention-heads", num_attention_heads)
    for flag in ("--num-key-value-heads", "--num-query-groups"):
        kv = get_flag(out, flag)
        if kv is not None:
            out = set_flag(out, flag, max(1, num_attention_heads * int(kv) // old_heads))
    ffn = get_flag(out, "--ffn-hidden-size")
    if ffn is not None:
        out = set_flag(out, "--ffn-hidden-size", max(1, int(ffn) * hidden_size // old_hidden))
    if get_flag(out, "--kv-channels") is not None:
        out = set_flag(out, "--kv-channels", hidden_size // num_attention_heads)
    out = set_flag(out, "--seq-length", seq_length)
    if get_flag(out, "--max-position-embeddings") is not None:
        out = set_flag(out, "--max-position-embeddings", seq_length)
    out = set_flag(out, "--ds-sequence-parallel-size", sp)
    out = set_flag(out, "--micro-batch-size", micro_batch_size)
    out = set_flag(out, "--global-batch-size", global_batch_size)
    old_iters = get_flag(out, "--train-iters")
    out = set_flag(drop_flag(drop_flag(out, "--train-samples"), "--train-tokens"), "--train-iters", train_iters)
    if old_iters is not None:  # iteration-based schedules shrink with the run (token/sample-based ones scale by
        for flag in ("--lr-warmup-iters", "--lr-decay-iters"):  # themselves through the smaller batch)
            value = get_flag(out, flag)
            if value is not None:
                out = set_flag(out, flag, int(value) * train_iters // int(old_iters))
    return out
