"""Concatenate several `.bin/.idx` datasets into one (documents in the order given).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

A directory stands for every prefix in it, sorted by name. All inputs must share one
token dtype. The output appears only once complete (temporary files, then rename).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megatron.data.preprocess import PreprocessError, find_prefixes, merge_datasets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories holding them")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    prefixes = []
    for item in args.input:
        prefixes.extend(find_prefixes(item) if os.path.isdir(item) else [item])
    try:
        merged = merge_datasets(prefixes, args.output_prefix)
    except (IndexedDatasetError, PreprocessError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets: {merged.num_documents} documents, {merged.num_tokens} tokens "
          f"-> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
