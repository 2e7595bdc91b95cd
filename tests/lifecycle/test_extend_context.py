"""examples_seq_parallel/extend_context.sh end to end at tiny scale on CPU (about 30 s on an idle machine: five
processes, training under torchrun with 2 ranks; the evaluations run in one process here, their SP form is
tested in test_long_context.py): a random Llama made with transformers is imported, evaluated, trained at 4x
its context with yarn RoPE scaling and Ulysses SP=2, evaluated again and exported; the exported model's
logits equal the project's at the new length."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORIG, FACTOR, IDS = 32, 4, 255  # NullTokenizer: ids 0..254, EOD 255 -> a 256-token vocabulary


def tiny_llama(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=IDS + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIG,
                                   rope_theta=10000.0, initializer_range=0.1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def corpus(prefix, docs=24, length=4 * ORIG + 40):
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(docs):
        builder.add_item(torch.from_numpy(rng.integers(0, IDS, size=length)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


@pytest.mark.slow
def test_extend_context_script(tmp_path):
    tiny_llama(tmp_path / "llama")
    corpus(str(tmp_path / "corpus"))
    out = tmp_path / "run"
    env = {**os.environ, "HF_DIR": str(tmp_path / "llama"), "DATA_PATH": str(tmp_path / "corpus"),
           "TOKENIZER_TYPE": "NullTokenizer", "VOCAB_SIZE": str(IDS), "FACTOR": str(FACTOR), "NPROC": "2",
           "TRAIN_ITERS": "2", "LR": "1e-3", "PASSKEY": "1:2-10:10-255", "PASSKEY_TRIALS": "2", "EVAL_DOCS": "2",
           "OUT": str(out), "LOG_INTERVAL": "1", "EVAL_NPROC": "1"}  # SP evaluation: test_long_context.py
    proc = subprocess.run(["bash", "examples_seq_parallel/extend_context.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = json.loads((out / "eval_before" / "results.json").read_text())
    after = json.loads((out / "eval_after" / "results.json").read_text())
    assert before["rope_scaling"] == [None, 1.0] and after["rope_scaling"] == ["yarn", float(FACTOR)]
    assert after["loss_by_position"]["seq_length"] == ORIG * FACTOR
    assert after["passkey"]["lengths"] == [ORIG, ORIG * FACTOR]
    for png in ("loss_by_position.png", "passkey.png"):
        assert (out / "eval_after" / png).stat().st_size > 1000
    assert "iteration        2/       2" in proc.stdout

    # the exported model computes what the project's does, at 4x the original context (yarn active)
    from megatron.inference.checkpoint import load_model

    ours = load_model(str(out / "extended")).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == FACTOR
    assert config["rope_parameters"]["original_max_position_embeddings"] == ORIG
    assert config["eos_token_id"] == IDS and config["vocab_size"] == IDS + 1
    tokens = torch.randint(0, IDS, (2, ORIG * FACTOR), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff
