"""The three conversion tools from the command line, on tiny checkpoints (about 15 s: three
subprocesses at ~3 s each for the torch import, the rest in-process)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron.checkpoint import TRACKER, checkpoint_dir, load_checkpoint
from megatron.checkpoint.hf import model_config_to_dict, to_hf
from megatron.model import GPTModel
from tests.conversion.tiny import hf_logits, project_logits, random_tokens, tiny_config, tiny_model
from tools.checkpoint import convert_from_hf, convert_to_hf, convert_to_torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
transformers = pytest.importorskip("transformers")
# dcp.save / dcp.load without a process group is the point of these tests, not a mistake
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is .*single process:UserWarning")


def run_tool(name, *args):
    """Run tools/checkpoint/<name>.py as a user would; returns (returncode, stdout + stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def write_training_checkpoint(root, model, iteration=7):
    """What a training run leaves under --save: a DCP directory with model, optimizer state and counters,
    plus the tracker file. Written by dcp.save in one process without a process group."""
    sd = model.state_dict()
    state = {"model": sd, "iteration": iteration, "consumed_samples": 56,
             "optimizer": {"state": {k: {"exp_avg": torch.randn_like(v)} for k, v in sd.items()},
                           "param_groups": [{"lr": 1e-4, "params": sorted(sd)}]},
             "config": model_config_to_dict(model.config)}
    dcp.save(state, checkpoint_id=checkpoint_dir(str(root), iteration), no_dist=True)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(str(iteration))


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_training_checkpoint_to_torch_to_hf(tmp_path):
    """DCP directory -> consolidated .pt -> HF directory, checked against the in-memory model."""
    model = tiny_model("gpt3")
    write_training_checkpoint(tmp_path / "ckpt", model)
    rc, out = run_tool("convert_to_torch", "--load", tmp_path / "ckpt", "--output", tmp_path / "model.pt")
    assert rc == 0, out
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    assert_same_state(blob["model"], model.state_dict())
    assert blob["config"] == model_config_to_dict(model.config) and blob["iteration"] == 7

    # a tiny word-level tokenizer.json, built offline
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 128)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rc, out = run_tool("convert_to_hf", "--load", tmp_path / "model.pt", "--output", tmp_path / "hf",
                       "--tokenizer-json", tmp_path / "tokenizer.json", "--eos-token-id", 5)
    assert rc == 0, out
    assert "GPT2LMHeadModel" in out
    from safetensors.torch import load_file

    expected, _ = to_hf(model.state_dict(), model.config)
    assert_same_state(load_file(tmp_path / "hf" / "model.safetensors"), expected)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    assert hf.config.eos_token_id == 5
    tokens = random_tokens()
    assert (hf_logits(hf, tokens) - project_logits(model, tokens)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("w3 w7")["input_ids"] == [3, 7]


def test_dcp_directory_straight_to_hf_in_process(tmp_path):
    """Llama family, reading one iter_ directory, exporting bf16."""
    model = tiny_model("llama")
    write_training_checkpoint(tmp_path / "ckpt", model, iteration=3)
    assert convert_to_hf.main(["--load", str(tmp_path / "ckpt" / "iter_0000003"), "--output",
                               str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert cfg["num_key_value_heads"] == 2 and cfg["rope_theta"] == 500.0 and cfg["vocab_size"] == 128


def test_from_hf_writes_a_checkpoint_that_training_loads(tmp_path, capsys):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    rc, out = run_tool("convert_from_hf", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "model.pt",
                       "--dcp", tmp_path / "ckpt", "--rotary-base", 1e6, "--max-position-embeddings", 4096,
                       "--make-vocab-size-divisible-by", 64)
    assert rc == 0, out
    assert "--rotary-base 1000000.0" in out and "--load" in out
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    config = convert_to_torch.model_config_from_dict(blob["config"])
    assert config.rotary_base == 1e6 and config.max_position_embeddings == 4096 and config.vocab_size == 128
    # the real training loader reads the DCP directory (model only: --finetune / --no-load-optim)
    model = GPTModel(config)
    assert load_checkpoint(str(tmp_path / "ckpt"), model, None, load_optim=False, log=lambda *_: None) == (0, 0)
    assert_same_state(model.state_dict(), blob["model"])
    # and the conversion tools read it back with its config
    ckpt = convert_to_torch.load_project_checkpoint(str(tmp_path / "ckpt"))
    assert ckpt.config == config and ckpt.iteration == 0


def run_config_for(config):
    from megatron.arguments import parse_args

    argv = convert_from_hf.megatron_flags(config) + [
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
        "--lr", "1e-4", "--mock-data", "--vocab-size", "128"]
    return parse_args(argv, world_size=1, check_environment=False, padded_vocab_size=128)


@pytest.mark.parametrize("form", ["asdict(RunConfig)", "RunConfig", "ModelConfig", "config.json", "missing"])
def test_config_is_found_in_any_stored_form(form, tmp_path):
    """The training side decides how it stores its config; the tools must find the model part in each form."""
    import dataclasses

    model = tiny_model("gpt3")
    run_config = run_config_for(model.config)
    extra = {"asdict(RunConfig)": {"config": dataclasses.asdict(run_config)},
             "RunConfig": {"run_config": run_config}, "ModelConfig": {"args": model.config}}.get(form, {})
    path = tmp_path / "iter_0000002"
    dcp.save({"model": model.state_dict(), "iteration": 2, **extra}, checkpoint_id=str(path), no_dist=True)
    if form == "config.json":
        (path / "config.json").write_text(json.dumps(model_config_to_dict(model.config)))
    if form == "missing":
        with pytest.raises(convert_to_torch.ConversionError, match="holds no model config.*config.json"):
            convert_to_torch.load_project_checkpoint(str(path))
        return
    ckpt = convert_to_torch.load_project_checkpoint(str(path))
    expected = run_config.model if "RunConfig" in form else model.config
    assert ckpt.config == expected and ckpt.iteration == 2
    assert_same_state(ckpt.state_dict, model.state_dict())


def test_printed_flags_rebuild_the_same_model():
    """The flags convert_from_hf prints must make pretrain_gpt.py build the converted architecture."""
    variants = [("gpt3", dict(kv_channels=8)), ("llama", dict(kv_channels=8)),
                ("gpt3", dict(position_embedding_type="rope", rotary_percent=0.5)),  # GPT-NeoX family
                ("gpt3", dict(activation="gelu_tanh")),
                ("llama", dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, original_max_position_embeddings=8,
                               yarn_mscale=0.7, yarn_mscale_all_dim=1.0))]
    for family, kw in variants:
        config = tiny_config(family, **kw)
        got = run_config_for(config).model
        keep = ("init_method_std",)
        assert got.replace(**{k: getattr(config, k) for k in keep}) == config


@pytest.mark.parametrize("tool, argv, message", [
    (convert_to_torch, ["--load", "{tmp}/nope", "--output", "{tmp}/x.pt"], "does not exist"),
    (convert_to_hf, ["--load", "{tmp}", "--output", "{tmp}/hf"], "is not a checkpoint"),
    (convert_to_hf, ["--load", "{tmp}/junk.pt", "--output", "{tmp}/hf"], "not a checkpoint torch.load can read"),
    (convert_to_hf, ["--load", "{tmp}/mixed.pt", "--output", "{tmp}/hf"], "unsupported architecture"),
    (convert_from_hf, ["--hf-dir", "{tmp}/nope", "--output", "{tmp}/x.pt"], "not a directory"),
    (convert_from_hf, ["--hf-dir", "{tmp}/bert", "--output", "{tmp}/x.pt"], "unsupported architecture"),
])
def test_clear_errors(tool, argv, message, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    mixed = tiny_config("gpt3", activation="swiglu")  # LayerNorm + SwiGLU: no HF class computes it
    torch.save({"model": GPTModel(mixed).state_dict(), "config": model_config_to_dict(mixed)}, tmp_path / "mixed.pt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    assert tool.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
