"""Train a tokenizer on a JSONL corpus, for users who have none (tools/train_tokenizer.py).

Two kinds, both trained by their libraries:

* SentencePiece (`train_sentencepiece`): used with `--tokenizer-type
  GPTSentencePieceTokenizer --tokenizer-model X.model`. Settings are chosen so that
  detokenize(tokenize(text)) == text for any text, code included: identity
  normalization (no NFKC), no whitespace collapsing, no dummy prefix space, byte
  fallback for characters outside the vocabulary (newlines, rare Unicode),
  whitespace-only pieces allowed (indentation). Training reads lines; it samples
  `input_sentence_size` of them so that it takes seconds, not minutes.
* Byte-level BPE (`train_bytelevel_bpe`, the `tokenizers` library): writes GPT-2 style
  `vocab.json` + `merges.txt` (GPT2BPETokenizer) and a `tokenizer.json`
  (HuggingFaceTokenizer), with `<|endoftext|>` as EOD.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterator, Sequence


def iter_texts(path: str, json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Texts of a JSONL file (plain or gzip); a file that is not JSONL yields its lines."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield line.rstrip("\n")
                continue
            if isinstance(obj, dict):
                for k in json_keys:
                    if isinstance(obj.get(k), str):
                        yield obj[k]
            elif isinstance(obj, str):
                yield obj


def sample_lines(texts: Iterator[str], max_lines: int, seed: int = 0, max_chars: int = 8192) -> list[str]:
    """Reservoir sample of the non-empty lines of `texts` (deterministic for a seed)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip() or len(line) > max_chars:
                continue
            seen += 1
            if len(out) < max_lines:
                out.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    out[j] = line
    return out


def train_sentencepiece(input_path: str, model_prefix: str, vocab_size: int = 8192, model_type: str = "bpe",
                        json_keys: Sequence[str] = ("text",), input_sentence_size: int = 150_000,
                        num_threads: int | None = None, seed: int = 0) -> str:
    """Train a SentencePiece model; returns the path of `{model_prefix}.model`.

    The model is written under a temporary prefix and renamed, so an interrupted run
    never leaves a `.model` that looks finished.
    """
    import sentencepiece as spm

    lines = sample_lines(iter_texts(input_path, json_keys), input_sentence_size, seed=seed)
    if not lines:
        raise ValueError(f"{input_path}: no text found under keys {list(json_keys)}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=tmp_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"


def train_bytelevel_bpe(input_path: str, output_dir: str, vocab_size: int = 8192,
                        json_keys: Sequence[str] = ("text",), texts: Sequence[str] | None = None) -> dict:
    """Train a GPT-2 style byte-level BPE; returns paths of vocab.json, merges.txt, tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else iter_texts(input_path, json_keys), trainer)
    os.makedirs(output_dir, exist_ok=True)
    vocab, merges = tok.model.save(output_dir)
    tok_json = os.path.join(output_dir, "tokenizer.json")
    tok.save(tok_json)
    return {"vocab_file": vocab, "merge_file": merges, "tokenizer_json": tok_json}


__all__ = ["iter_texts", "sample_lines", "train_bytelevel_bpe", "train_sentencepiece"]
