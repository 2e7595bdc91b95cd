"""--long-context-eval-interval: the training model (SP=2, ZeRO-3) evaluates itself every N steps and logs
`long_context` events and scalars; the last one equals the offline tool on the saved checkpoint (about 6 s)."""

import json
import os

import numpy as np
import torch

SEQ = 64


def write_corpus(prefix, docs=12, length=100, seed=0):
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(docs):
        doc = rng.integers(0, 100, size=length)
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _train(argv):
    import pretrain_gpt

    return pretrain_gpt.main(argv)


def test_periodic_long_context_eval_matches_the_tool(ranks, tmp_path):
    from tools.evaluate_long_context import build_parser, evaluate

    prefix = str(tmp_path / "corpus")
    write_corpus(prefix)
    log = tmp_path / "log.jsonl"
    argv = (f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length {SEQ} --micro-batch-size 2 "
            f"--global-batch-size 2 --train-iters 4 --lr 3e-3 --hidden-dropout 0 --attention-dropout 0 "
            f"--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
            f"--ds-sequence-parallel-size 2 --zero-stage 3 --tokenizer-type NullTokenizer --vocab-size 100 "
            f"--data-path {prefix} --split 100,0,0 --eval-iters 0 --log-interval 10 "
            f"--long-context-eval-interval 2 --long-context-eval-documents 3 "
            f"--save {tmp_path / 'ck'} --log-json {log}").split()
    assert ranks(2, _train, argv) == [0, 0]
    events = [json.loads(x) for x in open(log)]
    evals = [e for e in events if e.get("event") == "long_context"]
    assert [e["iteration"] for e in evals] == [2, 4]
    last = evals[-1]
    # the same numbers from the checkpoint, on one process, with the offline tool
    args = build_parser().parse_args(["--load", str(tmp_path / "ck"), "--data-path", prefix, "--num-documents", "3",
                                      "--seq-length", str(SEQ)])
    result = evaluate(args)["loss_by_position"]
    assert result["bucket_edges"] == last["bucket_edges"]
    a, b = np.array(last["loss_by_bucket"]), np.array(result["mean_loss"])
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5
    assert os.path.isdir(tmp_path / "ck")
