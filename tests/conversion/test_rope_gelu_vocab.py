"""Hugging Face models people actually load, converted exactly both ways (about 5 s): Llama with
`rope_scaling` (linear, dynamic, yarn, llama3), GPT-NeoX with partial rotary (+ yarn), GPT-2 with
OpenAI's tanh GeLU, and a padded vocabulary that no longer changes the loss.

References are transformers' own models on the same tokens, at sequence lengths beyond the
original context (where scaling, dynamic NTK in particular, is active)."""

import pytest
import torch

from megatron.checkpoint.hf import from_hf, hf_family, to_hf
from megatron.model import GPTModel
from tests.conversion.tiny import hf_logits, project_logits, random_tokens, tiny_model
from tools.checkpoint.convert_to_hf import write_hf_directory

transformers = pytest.importorskip("transformers")
TOL = 1e-5  # max |logit difference|, logits of order 1
ORIG, SEQ, VOCAB = 16, 40, 100

ROPE = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 3.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIG, "beta_fast": 8.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
}


def _perturb_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def hf_llama(kind):
    torch.manual_seed(3)
    max_pos = ORIG if kind == "dynamic" else 4 * ORIG
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                   initializer_range=0.2,
                                   rope_parameters={"rope_type": kind, "rope_theta": 500.0, **ROPE[kind]})
    return _perturb_norms(transformers.LlamaForCausalLM(cfg))


def hf_neox(rope=None, act="gelu_new", tied=False):
    torch.manual_seed(4)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=4 * ORIG, hidden_act=act,
                                     use_parallel_residual=False, initializer_range=0.2, tie_word_embeddings=tied,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                      "partial_rotary_factor": 0.25, **(rope or {})})
    return _perturb_norms(transformers.GPTNeoXForCausalLM(cfg))


def convert(hf, **kw):
    sd, config = from_hf(hf.state_dict(), hf.config.to_dict(), **kw)
    model = GPTModel(config).eval()
    model.load_state_dict(sd, strict=True)
    return model


def check_export(model, tmp_path, cls):
    """Export, load with transformers (a fresh model: its dynamic-RoPE cache is stateful), same logits."""
    hf_sd, hf_config = to_hf(model.state_dict(), model.config)
    write_hf_directory(str(tmp_path), hf_sd, hf_config)
    back = getattr(transformers, cls).from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    tokens = random_tokens(seq=SEQ, vocab=VOCAB, seed=9)
    assert (project_logits(model, tokens) - hf_logits(back.eval(), tokens)).abs().max() < TOL
    return hf_config


@pytest.mark.parametrize("kind", list(ROPE))
def test_llama_rope_scaling_converts_exactly(kind, tmp_path):
    hf = hf_llama(kind)
    model = convert(hf)
    assert model.config.rope_scaling_type == kind and hf_family(model.config) == "llama"
    tokens = random_tokens(seq=SEQ, vocab=VOCAB)
    ours = project_logits(model, tokens)
    assert ours.std() > 0.5
    assert (ours - hf_logits(hf, tokens)).abs().max() < TOL
    hf_config = check_export(model, tmp_path, "LlamaForCausalLM")
    written = hf_config["rope_parameters"]
    assert written["rope_type"] == kind and all(written[k] == v for k, v in ROPE[kind].items())
    assert hf_config["rope_scaling"]["type"] == kind  # for transformers 4 and serving stacks


def test_neox_partial_rotary_with_yarn_and_tanh_gelu(tmp_path):
    hf = hf_neox({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG})
    model = convert(hf)
    c = model.config
    assert (c.rotary_percent, c.rotary_dim, c.rope_scaling_type, c.activation) == (0.25, 4, "yarn", "gelu_tanh")
    assert hf_family(c) == "gpt_neox"
    tokens = random_tokens(seq=SEQ, vocab=VOCAB)
    assert (project_logits(model, tokens) - hf_logits(hf, tokens)).abs().max() < TOL
    hf_config = check_export(model, tmp_path, "GPTNeoXForCausalLM")
    assert hf_config["rope_parameters"]["partial_rotary_factor"] == 0.25 and hf_config["rotary_pct"] == 0.25


def test_project_model_with_partial_rotary_exports_as_neox(tmp_path):
    """A GPT-3 style model trained with --use-rotary-position-embeddings --rotary-percent 0.5."""
    model = tiny_model("gpt3", position_embedding_type="rope", rotary_percent=0.5, activation="gelu",
                       untie_embeddings_and_output_weights=False)
    hf_sd, hf_config = to_hf(model.state_dict(), model.config)
    assert hf_config["architectures"] == ["GPTNeoXForCausalLM"] and hf_config["hidden_act"] == "gelu"
    back, back_config = from_hf(hf_sd, hf_config)
    assert back_config == model.config and all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    check_export(model, tmp_path, "GPTNeoXForCausalLM")


def test_parallel_residual_neox_is_refused_by_name():
    hf = hf_neox()
    with pytest.raises(Exception, match="use_parallel_residual=true"):
        from_hf(hf.state_dict(), {**hf.config.to_dict(), "use_parallel_residual": True})


def test_openai_gpt2_gelu_new_is_exact():
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  initializer_range=0.2)
    hf = _perturb_norms(transformers.GPT2LMHeadModel(cfg))
    model = convert(hf)
    assert model.config.activation == "gelu_tanh"
    tokens = random_tokens(vocab=VOCAB)
    assert (project_logits(model, tokens) - hf_logits(hf, tokens)).abs().max() < TOL
    assert to_hf(model.state_dict(), model.config)[1]["activation_function"] == "gelu_new"


def test_padded_vocab_import_keeps_the_loss_and_export_drops_the_padding(tmp_path):
    """Padding to 128 used to change the loss by ~1% (padding logits 0 joined the softmax)."""
    hf = hf_llama("linear")
    model = convert(hf, make_vocab_size_divisible_by=128)
    assert (model.config.vocab_size, model.config.true_vocab_size) == (128, VOCAB)
    tokens = random_tokens(seq=SEQ, vocab=VOCAB)
    with torch.no_grad():
        theirs = hf(tokens, labels=tokens).loss  # mean over next-token predictions
        ours = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    assert abs(ours.item() - theirs.item()) / theirs.item() < 1e-6
    hf_config = check_export(model, tmp_path, "LlamaForCausalLM")
    assert hf_config["vocab_size"] == VOCAB
