"""Export writes the training tokenizer's end-of-document token as eos (config.json, generation_config.json,
tokenizer_config.json) and copies the tokenizer, so transformers' generate() stops there with no
argument (about 3 s)."""

import json

import pytest
import torch

from tests.conversion.tiny import tiny_model
from tools.checkpoint import convert_to_hf
from tools.checkpoint.convert_to_torch import save_dcp_checkpoint

transformers = pytest.importorskip("transformers")


def test_export_carries_eod_as_eos_and_generate_stops_there(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, 128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model("llama", untie_embeddings_and_output_weights=True)
    with torch.no_grad():  # every logit equal: greedy picks the first id, which is the EOD token
        model.output_layer.weight.zero_()
    data = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tmp_path / "tokenizer.json")}
    save_dcp_checkpoint(str(tmp_path / "ckpt"), model.state_dict(), model.config, iteration=1,
                        run_config={"data": data})
    assert convert_to_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token_id == 0 and hf_tok("w3 w7")["input_ids"] == [3, 7]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([[3, 7, 9]]), max_new_tokens=8, do_sample=False)  # no eos argument
    assert out[0, 3:].tolist() == [0]
