"""Train a tokenizer on a JSONL corpus (for users who have none).

    # SentencePiece -> --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model out/tokenizer.model
    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix out/tokenizer --vocab-size 8192
    # byte-level BPE -> GPT2BPETokenizer (vocab.json, merges.txt) or HuggingFaceTokenizer (tokenizer.json)
    python tools/train_tokenizer.py --input corpus.jsonl --type bpe --output-dir out/ --vocab-size 8192

SentencePiece settings make detokenize(tokenize(text)) == text (see
megatron/data/tokenizer_training.py); training samples --input-sentence-size lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.tokenizer_training import train_bytelevel_bpe, train_sentencepiece  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (or .gz) corpus")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--type", choices=["sentencepiece", "bpe"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output-prefix", default=None, help="sentencepiece: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--output-dir", default=None, help="bpe: writes vocab.json, merges.txt, tokenizer.json")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece algorithm")
    p.add_argument("--input-sentence-size", type=int, default=150_000, help="sentencepiece: lines sampled")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.type == "sentencepiece":
        if not args.output_prefix:
            p.error("--type sentencepiece needs --output-prefix")
        path = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, args.model_type,
                                   args.json_keys, args.input_sentence_size)
        print(f"trained SentencePiece ({args.model_type}, {args.vocab_size} pieces) in "
              f"{time.perf_counter() - t0:.1f} s -> {path}")
        print(f"use: --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model {path}")
    else:
        if not args.output_dir:
            p.error("--type bpe needs --output-dir")
        out = train_bytelevel_bpe(args.input, args.output_dir, args.vocab_size, args.json_keys)
        print(f"trained byte-level BPE ({args.vocab_size}) in {time.perf_counter() - t0:.1f} s")
        print(f"use: --tokenizer-type GPT2BPETokenizer --vocab-file {out['vocab_file']} --merge-file {out['merge_file']}")
        print(f" or: --tokenizer-type HuggingFaceTokenizer --tokenizer-model {out['tokenizer_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
