"""Data pipeline benchmark: preprocessing, index building, per-step loading.

    python benchmarks/bench_data.py [--corpus-dir data/corpus] [--preprocess-mb 8]

Prints a markdown table:

* preprocessing throughput of tools/preprocess_data.py with 1 and 2 workers, in MB/s of
  text per worker (wall clock) and in MB per CPU-second of all its processes; the ratio
  column divides the latter by the bare tokenizer's MB per CPU-second on the same texts
  (1.0 = reading JSON, pickling and writing cost nothing on top of tokenization). CPU
  time is reported because a shared machine's load distorts wall-clock rates;
* index build time (doc_idx + sample_idx + shuffle_idx) for a synthetic 1B-token corpus
  at seq 32k (sizes only: no token file is needed to build an index), the greedy blend
  of 3 datasets over 3M samples, and the EOD table scan of the real corpus;
* per-step loading time of one micro-batch (b=1) at seq 32k and 128k on the real corpus,
  for the full sample (SP=1) and for one rank's slice at SP=8, with
  reset_position_ids + reset_attention_mask + eod_mask_loss on.

Uses data/corpus from tools/build_corpus.py (run it first). The development machine is
shared: the load average is printed with the table, and ratios are more stable than
absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.eod_index import scan_eod_positions  # noqa: E402
from megatron.data.gpt_dataset import GPTDataset  # noqa: E402
from megatron.data.index_mapping import build_blending_indices, build_index_mappings  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from megatron.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron.data.sharding import get_sp_batch  # noqa: E402
from megatron.data.tokenizers import build_tokenizer  # noqa: E402


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the preprocessing workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    """(wall seconds, CPU seconds) of fn(): CPU time is what a loaded shared machine cannot distort."""
    w0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - w0, _cpu_seconds() - c0


def bench_preprocess(corpus_dir, mb, tmp, rows):
    src = os.path.join(corpus_dir, "corpus.jsonl")
    model = os.path.join(corpus_dir, "tokenizer.model")
    sub = os.path.join(tmp, "sub.jsonl")
    texts, size = [], 0
    with open(src, encoding="utf-8") as f, open(sub, "w", encoding="utf-8") as out:
        # every 7th document, so the sample mixes stdlib and site-packages files
        for i, line in enumerate(f):
            if i % 7:
                continue
            out.write(line)
            texts.append(json.loads(line)["text"])
            size += len(line.encode("utf-8"))
            if size >= mb * 1e6:
                break
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    wall, cpu = timed(lambda: [tok.tokenize(t) for t in texts])
    bare_cpu_rate = text_mb / cpu
    rows.append(("preprocess", f"bare tokenizer, SentencePiece BPE 8k, 1 process ({text_mb:.1f} MB of text)",
                 f"{text_mb / wall:.2f} MB/s wall, {bare_cpu_rate:.2f} MB/CPU-s", "1.00"))
    for workers in (1, 2):
        cfg = PreprocessConfig(input=sub, output_prefix=os.path.join(tmp, f"w{workers}"),
                               tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=model,
                               append_eod=True, workers=workers, quiet=True)
        wall, cpu = timed(lambda cfg=cfg: preprocess(cfg))
        rows.append(("preprocess", f"preprocess_data.py --workers {workers}",
                     f"{text_mb / wall / workers:.2f} MB/s wall per worker ({text_mb / wall:.2f} total), "
                     f"{text_mb / cpu:.2f} MB/CPU-s", f"{text_mb / cpu / bare_cpu_rate:.2f}"))


def best_timed(fn, repeat=2):
    """Fastest of `repeat` runs, as (wall s, CPU s)."""
    return min((timed(fn) for _ in range(repeat)), key=lambda t: t[0])


def fmt(wall, cpu, scale=1.0, unit="s"):
    return f"{wall * scale:.2f} {unit} ({cpu * scale:.2f} {unit} CPU)"


def bench_index(corpus_dir, rows):
    rng = np.random.default_rng(0)
    # ~1B tokens in documents of 1..~8k tokens (lognormal, mean ~1.1k)
    sizes = np.clip(rng.lognormal(6.5, 1.0, size=900_000), 1, 8192).astype(np.int32)
    total = int(sizes.sum(dtype=np.int64))
    seq = 32768
    for epochs in (1, 3):
        n = (total * epochs - 1) // seq - 5
        out = {}
        wall, cpu = best_timed(lambda n=n, out=out: out.update(r=build_index_mappings(np.arange(len(sizes)), sizes, n,
                                                                                          seq, 1)))
        e = out["r"][3]["num_epochs"]
        rows.append(("index", f"GPT index (doc/sample/shuffle idx), {total / 1e9:.2f}B tokens, {len(sizes)} docs, "
                     f"seq 32k, {n} samples, {e} epoch{'s' if e > 1 else ''}", fmt(wall, cpu), ""))
    w = np.array([0.5, 0.3, 0.2])
    rows.append(("index", "blend of 3 datasets, 3M samples (identical to Megatron's greedy loop)",
                  fmt(*best_timed(lambda: build_blending_indices(w, 3_000_000))), ""))
    indexed = MMapIndexedDataset(os.path.join(corpus_dir, "corpus_text_document"))
    scan_eod_positions(indexed, 2)  # page in
    wall, cpu = best_timed(lambda: scan_eod_positions(indexed, 2), 3)
    gb = indexed.tokens.nbytes / 1e9
    rows.append(("index", f"EOD table scan of the corpus ({indexed.num_tokens / 1e6:.0f}M tokens, {gb:.2f} GB, cached)",
                 f"{fmt(wall, cpu)}, {gb / cpu:.1f} GB per CPU-s", ""))


def bench_loading(corpus_dir, tmp, rows):
    indexed = MMapIndexedDataset(os.path.join(corpus_dir, "corpus_text_document"))
    eod = 2  # the SentencePiece model's </s>
    docs = np.arange(len(indexed))
    for seq in (32768, 131072):
        ds = GPTDataset("train", indexed, docs, 64, seq, 1234, cache_dir=tmp)
        ds.prepare_eod(eod, collective=False)
        samples = list(range(min(len(ds), 32)))
        flags = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
        get_sp_batch(ds, [0], seq, 0, 1, eod, **flags)  # warm
        for p in (1, 8):
            r = p - 1  # the last rank has the most EODs in front of it

            def steps(r=r, p=p, ds=ds, seq=seq, samples=samples, flags=flags):
                for i in samples:
                    get_sp_batch(ds, [i], seq, r, p, eod, **flags)

            wall, cpu = best_timed(steps)
            pieces = np.mean([len(ds.pieces(i)[0]) for i in samples])
            rows.append(("loading", f"seq {seq // 1024}k, SP={p} (rank {r}: {seq // p} tokens), b=1, "
                         f"~{pieces:.0f} docs/sample", fmt(wall, cpu, 1e3 / len(samples), "ms/step"), ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", default="data/corpus")
    p.add_argument("--preprocess-mb", type=float, default=8.0)
    p.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "index", "loading"])
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.corpus_dir, "corpus_text_document.idx")):
        print(f"no corpus in {args.corpus_dir}: run  python tools/build_corpus.py --output-dir {args.corpus_dir}")
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "preprocess" not in args.skip:
            bench_preprocess(args.corpus_dir, args.preprocess_mb, tmp, rows)
        if "index" not in args.skip:
            bench_index(args.corpus_dir, rows)
        if "loading" not in args.skip:
            bench_loading(args.corpus_dir, tmp, rows)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPU cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("| stage | what | time / throughput | CPU-throughput ratio to bare tokenizer |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
