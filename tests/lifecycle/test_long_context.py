"""Long-context evaluation (about 8 s): a tiny model trained here to retrieve scores far above chance and
an untrained one does not; the SP-distributed evaluation (Ulysses, and Ulysses x zigzag ring) equals
one process; the tool writes JSON, plots and TensorBoard scalars from a checkpoint and a .bin/.idx prefix."""

import json
import os

import numpy as np
import pytest
import torch

from megatron.config import ModelConfig, ParallelConfig
from megatron.core import parallel_state as ps
from megatron.inference.long_context import LongContextEvaluator, PasskeyTask, bucket_edges
from megatron.model import GPTModel
from megatron.parallel import parallelize_gpt

V, S, MARKER, DIGITS, FILLER = 32, 32, 1, (2, 10), (10, 32)
TASK = PasskeyTask.synthetic(MARKER, DIGITS, FILLER)
LENGTHS, DEPTHS = [32, 64], [0.0, 0.5, 1.0]


def config():
    return ModelConfig.llama(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=V,
                             ffn_hidden_size=128, max_position_embeddings=S, hidden_dropout=0.0, attention_dropout=0.0)


def train_retrieval(steps=40, seed=0):
    """A few AdamW steps on passkey examples (loss on the answer token): the model learns to copy the
    only digit token of its context."""
    torch.manual_seed(seed)
    model = GPTModel(config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = torch.from_numpy(np.stack([TASK.example(S, rng.random(), rng)[0] for _ in range(32)]))
        loss = model(batch[:, :-1], labels=batch[:, 1:])[:, -1].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return train_retrieval()


def documents(n=4, length=80, seed=5):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):  # passkey-like documents: loss varies with position
        doc, _ = TASK.example(length - 1, rng.random(), rng)
        docs.append(doc)
    return docs


def test_trained_model_retrieves_and_an_untrained_one_does_not(trained):
    torch.manual_seed(1)
    untrained = GPTModel(config()).eval()
    good = LongContextEvaluator(trained).passkey(TASK, LENGTHS, DEPTHS, trials=16)
    bad = LongContextEvaluator(untrained).passkey(TASK, LENGTHS, DEPTHS, trials=16)
    assert good["chance"] == 1 / 8
    assert good["mean_accuracy"] > 0.8, good["accuracy"]  # 2x the trained context included
    assert bad["mean_accuracy"] < 0.4, bad["accuracy"]
    assert np.mean(good["answer_logprob"]) > np.mean(bad["answer_logprob"]) + 1.0


def _sp_eval(state_dict, ring):
    state = ps.initialize_model_parallel(sequence_parallel_size=2, ring_attention_size=ring)
    model = GPTModel(config())
    model.load_state_dict(state_dict)
    model = parallelize_gpt(model, state, ParallelConfig(sequence_parallel_size=2, ring_attention_size=ring),
                            data_parallel=False)
    ev = LongContextEvaluator(model, state, show_progress=False)
    return {"loss_by_position": ev.loss_by_position(documents(), 64, num_buckets=8),
            "passkey": ev.passkey(TASK, LENGTHS, DEPTHS, trials=4)}


def test_sp_evaluation_equals_one_process(ranks, trained):
    ev = LongContextEvaluator(trained, show_progress=False)
    ref_loss = ev.loss_by_position(documents(), 64, num_buckets=8)
    ref_key = ev.passkey(TASK, LENGTHS, DEPTHS, trials=4)
    for ring in (1, 2):
        for got in ranks(2, _sp_eval, trained.state_dict(), ring):
            a, b = np.array(got["loss_by_position"]["mean_loss"]), np.array(ref_loss["mean_loss"])
            assert np.abs(a - b).max() / np.abs(b).max() < 1e-5, (ring, a, b)
            assert got["loss_by_position"]["tokens"] == ref_loss["tokens"]
            assert got["passkey"]["accuracy"] == ref_key["accuracy"]
            lp, ref = np.array(got["passkey"]["answer_logprob"]), np.array(ref_key["answer_logprob"])
            assert np.abs(lp - ref).max() <= 1e-5 * np.abs(ref).max(), (ring, lp, ref)


def test_bucket_edges():
    assert bucket_edges(64, 4) == [0, 16, 32, 48, 64]
    log = bucket_edges(1024, 10, "log")
    assert log[0] == 0 and log[-1] == 1024 and log == sorted(set(log)) and log[2] - log[1] < log[-1] - log[-2]


def test_tool_writes_json_plots_and_tensorboard(trained, tmp_path, capsys):
    """tools/evaluate_long_context.py on a DCP checkpoint and a .bin/.idx prefix, in this process."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from tools.checkpoint.convert_to_torch import save_dcp_checkpoint
    from tools.evaluate_long_context import main

    save_dcp_checkpoint(str(tmp_path / "ckpt"), trained.state_dict(), trained.config, iteration=40)
    prefix = str(tmp_path / "corpus")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in documents(n=6) + [np.arange(10, 20)]:  # a short document is skipped
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    out = tmp_path / "eval"
    argv = ["--load", str(tmp_path / "ckpt"), "--data-path", prefix, "--seq-length", "64", "--num-documents", "3",
            "--buckets", "4", "--passkey-lengths", "32", "64", "--passkey-depths", "0", "1", "--passkey-trials", "4",
            "--passkey-synthetic", f"{MARKER}:{DIGITS[0]}-{DIGITS[1]}:{FILLER[0]}-{FILLER[1]}",
            "--output-dir", str(out), "--tensorboard-dir", str(tmp_path / "tb")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[long-context eval] passkey retrieval: 16/16" in captured.err  # progress with an ETA
    result = json.loads((out / "results.json").read_text())
    assert result["iteration"] == 40 and result["loss_by_position"]["documents"] == 3
    assert len(result["loss_by_position"]["mean_loss"]) == 4 and result["passkey"]["mean_accuracy"] > 0.8
    for png in ("loss_by_position.png", "passkey.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    # an earlier run drawn next to a new one
    assert main(argv[:-4] + ["--output-dir", str(tmp_path / "eval2"), "--compare",
                             f"before={out / 'results.json'}", "--no-plots"]) == 0
    assert main(["--load", str(tmp_path / "ckpt")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
