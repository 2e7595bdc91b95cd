"""The command-line tools end to end (small inputs)."""

import os

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.tokenizers import build_tokenizer
from tools import build_corpus, train_tokenizer


def test_train_tokenizer_cli(tmp_path, corpus_path, texts, capsys):
    assert train_tokenizer.main(["--input", corpus_path, "--output-prefix", str(tmp_path / "sp"),
                                 "--vocab-size", "300", "--input-sentence-size", "2000"]) == 0
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert all(tok.detokenize(tok.tokenize(t)) == t for t in texts)
    assert train_tokenizer.main(["--input", corpus_path, "--type", "bpe", "--output-dir", str(tmp_path / "bpe"),
                                 "--vocab-size", "300"]) == 0
    assert sorted(os.listdir(tmp_path / "bpe")) == ["merges.txt", "tokenizer.json", "vocab.json"]
    assert "GPT2BPETokenizer" in capsys.readouterr().out


def test_build_corpus_small_and_idempotent(tmp_path, capsys):
    out = tmp_path / "corpus"
    args = ["--output-dir", str(out), "--target-mb", "0.4", "--vocab-size", "400", "--workers", "2",
            "--stdlib-only", "--input-sentence-size", "5000"]
    assert build_corpus.main(args) == 0
    first = capsys.readouterr().out
    assert "[1/3] corpus:" in first and "--data-path" in first
    ds = MMapIndexedDataset(str(out / "corpus_text_document"))
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(out / "tokenizer.model"))
    import json

    with open(out / "corpus.jsonl") as f:
        docs = [json.loads(line) for line in f]
    assert ds.num_documents == len(docs) >= 2 and docs[0]["path"].startswith("stdlib/")
    for i in (0, len(docs) - 1):
        ids = ds.document(i)
        assert ids[-1] == tok.eod and tok.detokenize(ids[:-1].tolist()) == docs[i]["text"]
    stamp = os.path.getmtime(out / "corpus_text_document.bin")
    assert build_corpus.main(args) == 0
    second = capsys.readouterr().out
    assert second.count("skipped") == 3 and os.path.getmtime(out / "corpus_text_document.bin") == stamp
    assert np.dtype(ds.dtype) == np.uint16
