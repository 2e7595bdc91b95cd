import gzip
import json
import os

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron.data.tokenizers import build_tokenizer
from tools import merge_datasets as merge_tool
from tools import preprocess_data as preprocess_tool

from .conftest import write_jsonl


def _run(tmp_path, corpus, ttype, kwargs, workers, tag, **extra):
    cfg = PreprocessConfig(input=corpus, output_prefix=str(tmp_path / tag), tokenizer_type=ttype,
                           workers=workers, quiet=True, batch_bytes=300, **kwargs, **extra)
    return preprocess(cfg)


@pytest.mark.parametrize("ttype", ["GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                   "HuggingFaceTokenizer"])
def test_round_trip_each_tokenizer_and_worker_count(tmp_path, ttype, tokenizer_specs, texts, corpus_path):
    kwargs = tokenizer_specs[ttype]
    tok = build_tokenizer(ttype, **kwargs)
    s1 = _run(tmp_path, corpus_path, ttype, kwargs, 1, "w1", append_eod=True)
    s3 = _run(tmp_path, corpus_path, ttype, kwargs, 3, "w3", append_eod=True)
    p1, p3 = s1.outputs["text"], s3.outputs["text"]
    assert p1.endswith("w1_text_document")
    for ext in (".bin", ".idx"):
        assert open(p1 + ext, "rb").read() == open(p3 + ext, "rb").read()  # same bytes on disk
    ds = MMapIndexedDataset(p1)
    assert ds.num_documents == len(texts) and s1.documents == len(texts)
    assert np.dtype(ds.dtype) == np.uint16
    for i, text in enumerate(texts):
        ids = ds.document(i).tolist()
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1]) == text


def test_null_tokenizer_and_empty_documents(tmp_path):
    texts = ["1 2 3", "", "7", "40 41 42 43"]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    s = _run(tmp_path, corpus, "NullTokenizer", dict(vocab_size=100), 2, "n", append_eod=True)
    ds = MMapIndexedDataset(s.outputs["text"])
    # an empty text is a document with no sequence (Megatron's preprocessing does the same)
    assert list(ds.sizes) == [4, 2, 5] and list(ds.doc_idx) == [0, 1, 1, 2, 3]
    assert [ds.document(i).tolist() for i in range(4)] == [[1, 2, 3, 100], [], [7, 100], [40, 41, 42, 43, 100]]
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert [tok.detokenize(ds.document(i)[:-1]) if ds.document(i).size else "" for i in range(4)] == texts


def test_gzip_and_several_keys(tmp_path):
    rows = [{"text": "1 2", "title": "9"}, {"text": "3", "title": "8 8"}]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    s = _run(tmp_path, str(path), "NullTokenizer", dict(vocab_size=10), 1, "g", json_keys=("text", "title"))
    assert MMapIndexedDataset(s.outputs["text"]).tokens.tolist() == [1, 2, 3]
    assert MMapIndexedDataset(s.outputs["title"]).tokens.tolist() == [9, 8, 8]


def test_malformed_json_reports_line_and_leaves_nothing(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["1 2"] * 20, extra_lines={8: '{"text": "1 2"'})
    with pytest.raises(PreprocessError, match=r"c\.jsonl:8: invalid JSON.*--skip-invalid"):
        _run(tmp_path, corpus, "NullTokenizer", dict(vocab_size=10), 2, "bad")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bad")]  # no outputs, no temporaries


def test_missing_key_and_wrong_type(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["1"] * 5, extra_lines={3: json.dumps({"txt": "1"})})
    with pytest.raises(PreprocessError, match=r"c\.jsonl:3: missing key 'text'"):
        _run(tmp_path, corpus, "NullTokenizer", dict(vocab_size=10), 1, "m")
    corpus = write_jsonl(tmp_path / "d.jsonl", ["1"] * 5, extra_lines={2: json.dumps({"text": 5})})
    with pytest.raises(PreprocessError, match=r"d\.jsonl:2: key 'text' holds int"):
        _run(tmp_path, corpus, "NullTokenizer", dict(vocab_size=10), 1, "m")


def test_skip_invalid_counts_and_skips(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["1", "2", "3", "4"],
                         extra_lines={2: "not json", 4: json.dumps({"other": "x"}), 6: "[1, 2]", 7: ""})
    s = _run(tmp_path, corpus, "NullTokenizer", dict(vocab_size=10), 2, "s", skip_invalid=True)
    assert s.skipped == 3 and s.skipped_lines == [2, 4, 6] and s.documents == 4
    assert MMapIndexedDataset(s.outputs["text"]).tokens.tolist() == [1, 2, 3, 4]


def test_cli_and_merge(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", ["1 2", "3"])
    b = write_jsonl(tmp_path / "b.jsonl", ["4 5 6"])
    for name, path in (("a", a), ("b", b)):
        rc = preprocess_tool.main(["--input", path, "--output-prefix", str(tmp_path / "out" / name),
                                   "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--append-eod",
                                   "--workers", "1", "--log-interval", "1"])
        assert rc == 0
    err = capsys.readouterr().err
    assert "docs/s" in err and "MB/s" in err
    rc = merge_tool.main(["--input", str(tmp_path / "out"), "--output-prefix", str(tmp_path / "ab")])
    assert rc == 0
    ds = MMapIndexedDataset(str(tmp_path / "ab"))
    assert [ds.document(i).tolist() for i in range(3)] == [[1, 2, 10], [3, 10], [4, 5, 6, 10]]
    bad = write_jsonl(tmp_path / "bad.jsonl", ["1"], extra_lines={1: "{"})
    rc = preprocess_tool.main(["--input", bad, "--output-prefix", str(tmp_path / "x"),
                               "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])
    assert rc == 1 and "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    rc = preprocess_tool.main(["--input", a, "--output-prefix", str(tmp_path / "x"),
                               "--tokenizer-type", "GPTSentencePieceTokenizer"])
    assert rc == 1 and "--tokenizer-model" in capsys.readouterr().err
