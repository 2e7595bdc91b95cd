"""Project <-> Hugging Face mappings, checked against transformers itself (about 8 s).

The references are independent of the mapping code: the transformers implementations of
GPT2LMHeadModel and LlamaForCausalLM, run on the same random tokens.
"""

import json

import pytest
import torch

from megatron.checkpoint.hf import ConversionError, from_hf, hf_family, to_hf
from megatron.config import ModelConfig
from megatron.model import GPTModel
from tests.conversion.tiny import (
    FAMILIES,
    V,
    hf_logits,
    project_logits,
    random_tokens,
    tiny_config,
    tiny_model,
)
from tools.checkpoint.convert_from_hf import read_hf_directory
from tools.checkpoint.convert_to_hf import write_hf_directory

transformers = pytest.importorskip("transformers")
HF_CLASS = {"gpt3": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
TOL = 1e-4


def load_hf(path, family):
    cls = getattr(transformers, HF_CLASS[family])
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


VARIANTS = [("gpt3", {}), ("llama", {}),
            ("gpt3", {"untie_embeddings_and_output_weights": True, "ffn_hidden_size": 80}),
            ("llama", {"untie_embeddings_and_output_weights": False, "add_bias_linear": True, "kv_channels": 8})]
VARIANT_IDS = ["gpt3", "llama", "gpt3-untied", "llama-tied-bias-d8"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family, variant", VARIANTS, ids=VARIANT_IDS)
def test_round_trip_is_bitwise_lossless(family, variant, dtype):
    model = tiny_model(family, **variant).to(dtype)
    sd, config = model.state_dict(), model.config
    hf_sd, hf_config = to_hf(sd, config)
    assert hf_config["dtype"] == str(dtype).removeprefix("torch.")
    back, back_config = from_hf(hf_sd, json.loads(json.dumps(hf_config)))
    assert back_config == config
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("family, variant", VARIANTS, ids=VARIANT_IDS)
def test_transformers_gives_the_same_logits(family, variant, tmp_path):
    model = tiny_model(family, **variant)
    hf_sd, hf_config = to_hf(model.state_dict(), model.config)
    # the Llama export is sharded into several files, as save_pretrained does for big models
    write_hf_directory(str(tmp_path), hf_sd, hf_config, max_shard_bytes=40_000 if family == "llama" else 2**30)
    if family == "llama":
        assert (tmp_path / "model.safetensors.index.json").exists()
    hf = load_hf(tmp_path, family)
    tokens = random_tokens()
    ours, theirs = project_logits(model, tokens), hf_logits(hf, tokens)
    assert ours.std() > 0.5, "logits too flat for the comparison to mean anything"
    assert (ours - theirs).abs().max().item() < TOL
    # the reader of HF directories gets the exact tensors back, shards included
    back_sd, back_cfg = read_hf_directory(str(tmp_path))
    assert back_cfg["vocab_size"] == V and all(torch.equal(back_sd[k], hf_sd[k]) for k in hf_sd)


def random_hf_model(family, vocab=100, **kw):
    """A randomly initialised transformers model (no download), with random norms so they matter."""
    torch.manual_seed(3)
    if family == "gpt3":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=0.2, **kw)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                       initializer_range=0.2, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_matches_transformers_and_pads_vocab(family):
    hf = random_hf_model(family, vocab=100)
    sd, config = from_hf(hf.state_dict(), hf.config.to_dict(), make_vocab_size_divisible_by=64)
    assert config.vocab_size == 128 and hf_family(config) == ("gpt2" if family == "gpt3" else "llama")
    assert config.true_vocab_size == 100  # the padding never enters a softmax
    model = GPTModel(config).eval()
    model.load_state_dict(sd, strict=True)
    assert torch.count_nonzero(sd["embedding.word_embeddings.weight"][100:]) == 0
    tokens = random_tokens(vocab=100)
    ours, theirs = project_logits(model, tokens)[..., :100], hf_logits(hf, tokens)
    assert (ours - theirs).abs().max().item() < TOL


def test_rotary_base_override_is_used():
    """A new base must change the config *and* the computation: the converted model equals an HF
    model that has the same weights and the new rope_theta."""
    hf = random_hf_model("llama")
    legacy = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"} | {"rope_theta": 10000.0}
    _, cfg_default = from_hf(hf.state_dict(), legacy)  # transformers 4 style config.json
    assert cfg_default.rotary_base == 10000.0
    sd, config = from_hf(hf.state_dict(), hf.config.to_dict(), rotary_base=1e6, max_position_embeddings=4096)
    assert config.rotary_base == 1e6 and config.max_position_embeddings == 4096
    model = GPTModel(config).eval()
    model.load_state_dict(sd)
    torch.manual_seed(0)
    hf_new = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **hf.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})).eval()
    hf_new.config._attn_implementation = "eager"
    hf_new.load_state_dict(hf.state_dict())
    tokens = random_tokens(vocab=100)
    ours = project_logits(model, tokens)
    assert (ours - hf_logits(hf_new, tokens)).abs().max().item() < TOL
    assert (ours - hf_logits(hf, tokens)).abs().max().item() > 1e-3  # the base really changed something


def test_exported_config_reads_back_in_transformers():
    model = tiny_model("llama", rotary_base=123456.0, untie_embeddings_and_output_weights=False)
    _, hf_config = to_hf(model.state_dict(), model.config)
    cfg = transformers.LlamaConfig(**hf_config)
    assert cfg.rope_parameters["rope_theta"] == 123456.0 and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16 and cfg.vocab_size == V


def test_unsupported_architectures_fail_clearly():
    with pytest.raises(ConversionError, match="unsupported architecture.*normalization='LayerNorm'"):
        hf_family(ModelConfig.llama(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=V,
                                    max_position_embeddings=8, normalization="LayerNorm"))
    with pytest.raises(ConversionError, match="num_query_groups=2.*grouped-query"):
        hf_family(tiny_config("gpt3", num_query_groups=2))
    with pytest.raises(ConversionError, match="model_type='bert'.*supported model types"):
        from_hf({}, {"model_type": "bert", "architectures": ["BertModel"]})
    hf = random_hf_model("gpt3")
    with pytest.raises(ConversionError, match="--rotary-base applies to RoPE models only"):
        from_hf(hf.state_dict(), hf.config.to_dict(), rotary_base=1e6)
    with pytest.raises(ConversionError, match="learned position embeddings are weights"):
        from_hf(hf.state_dict(), hf.config.to_dict(), max_position_embeddings=64)
    with pytest.raises(ConversionError, match="activation_function='relu'.*exact"):
        from_hf(hf.state_dict(), {**hf.config.to_dict(), "activation_function": "relu"})
    llama = random_hf_model("llama")
    scaled = {**llama.config.to_dict(), "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    with pytest.raises(ConversionError, match="RoPE scaling 'longrope'.*--rotary-base"):
        from_hf(llama.state_dict(), scaled)
    assert from_hf(llama.state_dict(), scaled, rotary_base=1e5)[1].rope_scaling_type is None
    partial = dict(llama.state_dict())
    del partial["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="missing.*up_proj"):
        from_hf(partial, llama.config.to_dict())
