"""Build the default training corpus from files already on this machine (no download).

    python tools/build_corpus.py --output-dir data/corpus [--target-mb 150] [--vocab-size 8192]

1. DIR/corpus.jsonl: one document per `.py` file, `{"text": source, "path": ...}`.
   First the Python standard library (sysconfig's 'stdlib', without its site-packages:
   ~31 MB on CPython 3.11), then, to reach --target-mb of long real documents, the `.py`
   files of this interpreter's site-packages (the project's venv: torch, numpy, ...).
   Files are taken in sorted path order, so the corpus is the same on every run of the
   same environment; files that are not UTF-8 are skipped. Nothing is repeated: if the
   files run out first, the corpus is simply smaller (its size is printed).
2. DIR/tokenizer.model: a SentencePiece BPE trained on a line sample of the corpus
   (exact round trips, see megatron/data/tokenizer_training.py).
3. DIR/corpus_text_document.{bin,idx}: the corpus tokenized with --append-eod.

Each step is skipped when its output exists and is complete (every output is written
under a temporary name and renamed when done); --force redoes all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset  # noqa: E402
from megatron.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron.data.tokenizer_training import train_sentencepiece  # noqa: E402

TOKENIZER_TYPE = "GPTSentencePieceTokenizer"


def source_roots() -> list:
    """(label, directory) pairs searched in order: the stdlib, then site-packages."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"])]
    for key in ("purelib", "platlib"):
        p = paths[key]
        if all(os.path.realpath(p) != os.path.realpath(r) for _, r in roots):
            roots.append(("site-packages", p))
    return roots


def iter_py_files(root: str):
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def write_corpus(path: str, target_bytes: int, include_site_packages: bool = True) -> dict:
    """Write the JSONL corpus; returns counts per source root."""
    stats = {"files": 0, "bytes": 0, "skipped_not_utf8": 0, "by_root": {}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for label, root in source_roots():
            if label != "stdlib" and not include_site_packages:
                continue
            n0 = stats["bytes"]
            for file in iter_py_files(root):
                if stats["bytes"] >= target_bytes:
                    break
                with open(file, "rb") as f:
                    raw = f.read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats["skipped_not_utf8"] += 1
                    continue
                if not text.strip():
                    continue
                rel = os.path.join(label, os.path.relpath(file, root))
                out.write(json.dumps({"text": text, "path": rel}) + "\n")
                stats["files"] += 1
                stats["bytes"] += len(raw)
            stats["by_root"][f"{label} ({root})"] = stats["bytes"] - n0
    os.replace(tmp, path)
    return stats


def dataset_complete(prefix: str) -> bool:
    try:
        MMapIndexedDataset(prefix)
        return True
    except (FileNotFoundError, IndexedDatasetError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--target-mb", type=float, default=150.0, help="corpus size to collect (MB of source)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--stdlib-only", action="store_true", help="do not add site-packages files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--input-sentence-size", type=int, default=150_000, help="lines sampled to train the tokenizer")
    p.add_argument("--force", action="store_true", help="rebuild every step")
    args = p.parse_args(argv)

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.jsonl")
    model = os.path.join(out, "tokenizer.model")
    prefix = os.path.join(out, "corpus")
    data_prefix = prefix + "_text_document"
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    if args.force or not os.path.isfile(corpus):
        stats = write_corpus(corpus, int(args.target_mb * 1e6), not args.stdlib_only)
        print(f"[1/3] corpus: {stats['files']} files, {stats['bytes'] / 1e6:.1f} MB "
              f"({stats['skipped_not_utf8']} non-UTF-8 files skipped) in {time.perf_counter() - t0:.1f} s")
        for root, nbytes in stats["by_root"].items():
            print(f"      {nbytes / 1e6:7.1f} MB from {root}")
        if stats["bytes"] < args.target_mb * 1e6:
            print(f"      (fewer .py files than --target-mb {args.target_mb:g}: the corpus is what exists)")
    else:
        print(f"[1/3] corpus exists, skipped ({os.path.getsize(corpus) / 1e6:.1f} MB JSONL)")

    t0 = time.perf_counter()
    if args.force or not os.path.isfile(model):
        train_sentencepiece(corpus, os.path.join(out, "tokenizer"), vocab_size=args.vocab_size,
                            input_sentence_size=args.input_sentence_size)
        print(f"[2/3] tokenizer: SentencePiece BPE, {args.vocab_size} pieces, in {time.perf_counter() - t0:.1f} s")
    else:
        print("[2/3] tokenizer exists, skipped")

    t0 = time.perf_counter()
    if args.force or not dataset_complete(data_prefix):
        preprocess(PreprocessConfig(input=corpus, output_prefix=prefix, tokenizer_type=TOKENIZER_TYPE,
                                    tokenizer_model=model, append_eod=True, workers=args.workers,
                                    log_interval=5000))
        print(f"[3/3] preprocessed in {time.perf_counter() - t0:.1f} s")
    else:
        print("[3/3] dataset exists, skipped")

    ds = MMapIndexedDataset(data_prefix)
    print(f"\ndone in {time.perf_counter() - t_all:.1f} s")
    print(f"  corpus     {corpus} ({os.path.getsize(corpus) / 1e6:.1f} MB)")
    print(f"  tokenizer  {model}")
    print(f"  dataset    {data_prefix}.bin/.idx ({ds.num_documents} documents, {ds.num_tokens} tokens, "
          f"{os.path.getsize(data_prefix + '.bin') / 1e6:.1f} MB)")
    print(f"  flags      --data-path {data_prefix} --tokenizer-type {TOKENIZER_TYPE} --tokenizer-model {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
