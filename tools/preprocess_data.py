"""Tokenize a JSONL corpus into Megatron `.bin/.idx` datasets (Megatron's flags).

    python tools/preprocess_data.py --input corpus.jsonl[.gz] --output-prefix data/my \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

writes data/my_text_document.{bin,idx} (one pair per --json-keys key). The order of
documents is the input order whatever --workers is, so the files are byte-identical.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.config import UserError  # noqa: E402
from megatron.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron.data.tokenizers import add_tokenizer_args  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file, one JSON object per line (gzip is detected)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one dataset each)")
    g.add_argument("--skip-invalid", action="store_true",
                   help="count and skip malformed lines (bad JSON, missing key) instead of stopping")
    g.add_argument("--split-sentences", action="store_true", help="not supported (GPT uses whole documents)")
    g.add_argument("--keep-newlines", action="store_true", help="accepted for compatibility; newlines are always kept")
    add_tokenizer_args(p)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix; '_{key}_document' is appended")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap (Megatron's default)")
    g.add_argument("--append-eod", action="store_true", help="end every non-empty document with the EOD token")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1, help="accepted for compatibility; must be 1")
    g.add_argument("--log-interval", type=int, default=1000, help="print progress every this many documents")
    args = p.parse_args(argv)
    if args.split_sentences:
        p.error("--split-sentences is not supported: GPT pretraining data is whole documents")
    if args.partitions != 1:
        p.error("--partitions > 1 is not supported; the workers already run in parallel")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    cfg = PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        json_keys=args.json_keys, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size, vocab_extra_ids=args.vocab_extra_ids,
        append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
        skip_invalid=args.skip_invalid,
    )
    try:
        preprocess(cfg)
    except (UserError, FileNotFoundError) as e:  # bad input, tokenizer or output path: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
