"""Shared fixtures: tiny corpora and tiny tokenizers trained on the fly (seconds)."""

from __future__ import annotations

import json
import random

import pytest

from megatron.data.tokenizer_training import train_bytelevel_bpe, train_sentencepiece

_WORDS = ("def class return import self lambda yield while for in if else print value index data "
          "token sample model layer tensor shape batch").split()


def make_texts(n: int = 40, seed: int = 0) -> list[str]:
    """Code-like documents with the things that break naive round trips: indentation,
    blank lines, tabs, trailing spaces, unicode, a leading space, a literal EOD string."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 12)):
            indent = " " * rng.choice([0, 4, 8]) + ("\t" if rng.random() < 0.1 else "")
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 8)))
            lines.append(indent + words + ("  " if rng.random() < 0.1 else ""))
        text = "\n".join(lines)
        if i % 7 == 3:
            text = " " + text + "\n\n# ünïcødé ✓ 数据 <|endoftext|> <s> </s>\n"
        texts.append(text)
    return texts


def write_jsonl(path, texts, key: str = "text", extra_lines: dict | None = None) -> str:
    """One JSON object per line; `extra_lines` maps a 1-based line number to raw text."""
    extra_lines = extra_lines or {}
    lines = [json.dumps({key: t, "id": i}) for i, t in enumerate(texts)]
    for line_no in sorted(extra_lines):
        lines.insert(line_no - 1, extra_lines[line_no])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def texts():
    return make_texts()


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, texts):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", texts)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpus_path):
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    return train_sentencepiece(corpus_path, str(prefix), vocab_size=320, input_sentence_size=5000, num_threads=1)


@pytest.fixture(scope="session")
def bpe_files(tmp_path_factory, corpus_path):
    return train_bytelevel_bpe(corpus_path, str(tmp_path_factory.mktemp("bpe")), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer_specs(sp_model, bpe_files):
    """(tokenizer_type, kwargs) for every type that can round-trip arbitrary text."""
    return {
        "GPT2BPETokenizer": dict(vocab_file=bpe_files["vocab_file"], merge_file=bpe_files["merge_file"]),
        "SentencePieceTokenizer": dict(tokenizer_model=sp_model),
        "GPTSentencePieceTokenizer": dict(tokenizer_model=sp_model),
        "HuggingFaceTokenizer": dict(tokenizer_model=bpe_files["tokenizer_json"]),
    }
