"""A padded vocabulary (--make-vocab-size-divisible-by) changes nothing: padding rows never take part
in a softmax, in the plain loss, the tiled loss (forward and backward), or the logits (about 1 s)."""

import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.model.tiling import TiledLanguageModelLoss
from tests.utils import rel_err

TRUE_V, PADDED_V, S = 100, 128, 16


def _models():
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=S, hidden_dropout=0.0,
                  attention_dropout=0.0, init_method_std=0.2)
    torch.manual_seed(0)
    padded = GPTModel(ModelConfig.gpt3(vocab_size=PADDED_V, true_vocab_size=TRUE_V, **common))
    with torch.no_grad():  # padding rows as a checkpoint might hold them: large, so a leak would show
        padded.embedding.word_embeddings.weight[TRUE_V:] = 5.0
    plain = GPTModel(ModelConfig.gpt3(vocab_size=TRUE_V, **common))
    sd = padded.state_dict()
    sd["embedding.word_embeddings.weight"] = sd["embedding.word_embeddings.weight"][:TRUE_V]
    plain.load_state_dict(sd)
    return padded, plain


def test_padding_rows_never_enter_the_softmax():
    padded, plain = _models()
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, TRUE_V, (2, S), generator=g), torch.randint(0, TRUE_V, (2, S), generator=g)
    expected = plain(tokens, labels=labels)
    assert rel_err(padded(tokens, labels=labels), expected) < 1e-6
    logits = padded(tokens)
    assert logits.shape == (2, S, TRUE_V) and rel_err(logits, plain(tokens)) < 1e-6

    # the tiled loss (what --tiled-loss-tokens swaps in): same losses and the same gradients
    padded.loss = TiledLanguageModelLoss(5)
    tiled = padded(tokens, labels=labels)
    assert rel_err(tiled, expected) < 1e-6
    tiled.sum().backward()
    expected.sum().backward()
    grad = padded.embedding.word_embeddings.weight.grad
    assert torch.count_nonzero(grad[TRUE_V:]) == 0
    assert rel_err(grad[:TRUE_V], plain.embedding.word_embeddings.weight.grad) < 1e-5
    for (name, p), q in zip(padded.layers.named_parameters(), plain.layers.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, name


def test_untied_output_layer_and_no_padding():
    common = dict(num_layers=1, hidden_size=32, num_attention_heads=4, max_position_embeddings=S,
                  hidden_dropout=0.0, attention_dropout=0.0, untie_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    model = GPTModel(ModelConfig.gpt3(vocab_size=PADDED_V, true_vocab_size=TRUE_V, **common))
    tokens = torch.randint(0, TRUE_V, (1, S))
    loss = model(tokens, labels=tokens)
    loss.sum().backward()
    assert torch.count_nonzero(model.output_layer.weight.grad[TRUE_V:]) == 0
    # true_vocab_size == vocab_size is no padding at all
    same = GPTModel(ModelConfig.gpt3(vocab_size=PADDED_V, true_vocab_size=PADDED_V, **common))
    assert same(tokens).shape[-1] == PADDED_V
