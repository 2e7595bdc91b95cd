import json

import pytest

from megatron.data.tokenizers import TOKENIZER_TYPES, TokenizerError, build_tokenizer, pad_vocab_size

ROUND_TRIP_TYPES = ["GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"]


@pytest.mark.parametrize("ttype", ROUND_TRIP_TYPES)
def test_round_trip_and_vocab(ttype, tokenizer_specs, texts):
    tok = build_tokenizer(ttype, **tokenizer_specs[ttype])
    for text in texts:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert 0 <= tok.eod < tok.vocab_size
    assert tok.padded_vocab_size % 128 == 0 and tok.padded_vocab_size >= tok.vocab_size


def test_eod_conventions(tokenizer_specs, sp_model, bpe_files):
    gpt2 = build_tokenizer("GPT2BPETokenizer", **tokenizer_specs["GPT2BPETokenizer"])
    with open(bpe_files["vocab_file"]) as f:
        vocab = json.load(f)
    assert gpt2.eod == vocab["<|endoftext|>"] and gpt2.vocab_size == len(vocab)
    # like Megatron's GPT-2 tokenizer, the literal text is not the EOD token
    assert gpt2.eod not in gpt2.tokenize("a <|endoftext|> b")

    gsp = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert gsp.eod == 2 and gsp.vocab_size == 320  # eos of the model, no extra tokens
    msp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model, vocab_extra_ids=2)
    # <CLS> <SEP> <EOD> <MASK> <PAD> appended (the model has <s>, </s>), then 2 extra ids
    assert msp.vocab_size == 320 + 5 + 2 and msp.eod == 322
    assert msp.tokenize("x<EOD>y").count(msp.eod) == 1
    assert msp.detokenize(msp.tokenize("a<MASK>b <extra_id_1>")) == "a<MASK>b <extra_id_1>"

    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe_files["tokenizer_json"])
    assert hf.eod == vocab["<|endoftext|>"]


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.vocab_size == 1001 and tok.eod == 1000 and tok.padded_vocab_size == 1024
    assert tok.tokenize("5 17 999") == [5, 17, 999]
    assert tok.detokenize([5, 17, 999]) == "5 17 999"
    assert tok.tokenize("") == []
    with pytest.raises(ValueError, match="integer"):
        tok.tokenize("5 x")


def test_padding():
    assert pad_vocab_size(50257, 128) == 50304
    assert pad_vocab_size(50257, 128, tensor_model_parallel_size=2) == 50432
    assert pad_vocab_size(256, 128) == 256
    tok = build_tokenizer("NullTokenizer", vocab_size=100, make_vocab_size_divisible_by=8)
    assert tok.padded_vocab_size == 104


def test_errors(tmp_path, bpe_files):
    with pytest.raises(TokenizerError) as e:
        build_tokenizer("GPT3Tokenizer")
    for name in TOKENIZER_TYPES:
        assert name in str(e.value)
    with pytest.raises(TokenizerError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", merge_file=bpe_files["merge_file"])
    with pytest.raises(TokenizerError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bpe_files["vocab_file"], merge_file=str(tmp_path / "no.txt"))
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        build_tokenizer("GPTSentencePieceTokenizer")
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="no hub downloads"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="gpt2")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_hf_directory_and_configured_eos(tmp_path, bpe_files):
    import shutil

    shutil.copy(bpe_files["tokenizer_json"], tmp_path / "tokenizer.json")
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    with open(bpe_files["vocab_file"]) as f:
        vocab = json.load(f)
    assert tok.eod == vocab["<|endoftext|>"]
    some_token = next(t for t in vocab if t not in ("<|endoftext|>",))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": some_token}}))
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)).eod == vocab[some_token]
