"""Blocks and models: output shapes, one jitted gradient step through each, configuration
errors, and dropout that is deterministic for the same rngs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nn_testing import VOCAB, assert_close, assert_useful_grads, normal, rngs, tiny_config, tokens

import flaxattn.nn as fnn

LENGTHS = np.array([6, 4], np.int32)


def _finite_grads(loss_fn, model):
    """Run `loss_fn(model) -> (loss, aux)` under jit with gradients; check them; return aux."""
    (loss, aux), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    assert np.isfinite(loss)
    assert_useful_grads(grads)
    return aux


def _mean_square(output, *others):
    return jnp.mean(output**2), (output, *others)


def test_layers():
    """A pre-LN encoder layer and a post-LN decoder layer."""
    x, memory = normal(0, (2, 6, 16)), normal(1, (2, 5, 16))
    encoder = fnn.TransformerEncoderLayer(16, 4, 32, num_kv_heads=2, rngs=rngs())
    decoder = fnn.TransformerDecoderLayer(16, 4, 32, num_kv_heads=2, pre_ln=False,
                                          rngs=rngs())
    (out,) = _finite_grads(lambda m: _mean_square(m(x, lengths=LENGTHS)), encoder)
    assert out.shape == (2, 6, 16)
    memory_lengths = np.array([5, 2], np.int32)
    (out,) = _finite_grads(
        lambda m: _mean_square(m(x, memory, lengths=LENGTHS, memory_lengths=memory_lengths)),
        decoder,
    )
    assert out.shape == (2, 6, 16)
    assert (decoder.self_attention.kind, decoder.cross_attention.kind) == ("self", "cross")


def test_encoder_decoder_transformer():
    config = tiny_config(src_vocab_size=11, tie_embeddings=True, positional="alibi")
    model = fnn.EncoderDecoderTransformer(config, rngs=rngs())
    src, tgt = tokens(0, (2, 5), vocab=11), tokens(1, (2, 6))
    src_lengths = np.array([5, 3], np.int32)
    (logits,) = _finite_grads(
        lambda m: _mean_square(m(src, tgt, src_lengths=src_lengths, tgt_lengths=LENGTHS)), model
    )
    assert logits.shape == (2, 6, VOCAB)


@pytest.mark.parametrize("positional", ["learned", "none"])
def test_decoder_lm(positional):
    model = fnn.DecoderLM(tiny_config(positional=positional, normalize_qk=True),
                          rngs=rngs())
    (logits,) = _finite_grads(lambda m: _mean_square(m(tokens(0, (2, 6)), lengths=LENGTHS)), model)
    assert logits.shape == (2, 6, VOCAB)


def test_decoder_lm_is_causal():
    """Changing a later token leaves the logits of earlier positions unchanged."""
    model = fnn.DecoderLM(tiny_config(positional="rope"), rngs=rngs())
    toks = tokens(0, (1, 6))
    forward = nnx.jit(lambda m, t: m(t))
    changed = toks.copy()
    changed[0, 4] = (toks[0, 4] + 1) % VOCAB
    before, after = forward(model, toks), forward(model, changed)
    assert_close(before[:, :4], after[:, :4])
    assert not np.allclose(before[:, 4:], after[:, 4:])


def _padding_is_ignored(model) -> None:
    """Gradients flow, and the logits do not depend on the tokens past each length."""
    toks = tokens(0, (2, 6))
    padded_differently = toks.copy()
    padded_differently[1, 4:] = 0
    logits, other = _finite_grads(
        lambda m: _mean_square(m(toks, LENGTHS), m(padded_differently, LENGTHS)), model
    )
    assert logits.shape == (2, 3)
    assert_close(other, logits)


def test_transformer_classifier_ignores_padding():
    _padding_is_ignored(fnn.TransformerClassifier(tiny_config(positional="t5"), 3,
                                                  rngs=rngs()))


def test_rnn_attention_classifier_ignores_padding():
    _padding_is_ignored(fnn.RNNAttentionClassifier(VOCAB, 8, 12, 3, cell="lstm",
                                                   rngs=rngs()))


def test_bahdanau_seq2seq():
    model = fnn.BahdanauSeq2Seq(11, VOCAB, 8, 12, cell="gru", rngs=rngs())
    src, src_lengths, tgt = tokens(0, (2, 6), vocab=11), LENGTHS, tokens(1, (2, 4))
    out = model.greedy_decode(src, src_lengths, max_length=4, bos_id=1)
    assert out.shape == (2, 4) and out.dtype == jnp.int32
    tgt_in = np.concatenate([np.ones((2, 1), np.int32), out[:, :-1]], axis=1)
    logits, teacher = _finite_grads(
        lambda m: _mean_square(m(src, src_lengths, tgt), m(src, src_lengths, tgt_in)), model
    )
    assert logits.shape == (2, 4, VOCAB)
    # Greedy decoding is teacher forcing on its own argmax outputs.
    assert_close(out, np.argmax(teacher, -1), atol=0)


@pytest.mark.parametrize("learn_bandwidth", [True, False])
def test_nadaraya_watson(learn_bandwidth):
    model = fnn.NadarayaWatson(learn_bandwidth=learn_bandwidth, bandwidth=0.5, rngs=rngs())
    queries, keys = np.linspace(0.0, 5.0, 4)[None], np.linspace(0.0, 5.0, 9)[None]
    values = np.sin(keys)

    def loss(m):
        out = m(queries, keys, values)
        return jnp.mean((out - jnp.sin(queries)) ** 2), out

    if learn_bandwidth:
        out = _finite_grads(loss, model)
    else:
        out = model(queries, keys, values)
        assert not nnx.state(model, nnx.Param)
    logits = -((queries[0, :, None] - keys[0, None, :]) ** 2) / (2 * 0.5**2)  # [T, S]
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert out.shape == (1, 4)
    assert_close(out[0], weights @ values[0])


def test_dropout_is_deterministic_for_the_same_rngs():
    config = tiny_config(dropout_rate=0.3, attention_dropout_rate=0.3)
    toks = tokens(0, (2, 6))
    forward = nnx.jit(lambda m, deterministic: m(toks, deterministic=deterministic),
                      static_argnums=1)

    def run(seed, deterministic=False):
        return forward(fnn.DecoderLM(config, rngs=rngs(0, dropout=seed)), deterministic)

    assert_close(run(1), run(1), atol=0, rtol=0)
    assert not np.allclose(run(1), run(2))
    assert_close(run(1, True), run(2, True), atol=0, rtol=0)
    model = fnn.DecoderLM(config, rngs=rngs(0, dropout=1))
    assert not np.allclose(forward(model, False), forward(model, False))  # the stream advances


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=18), r"d_model \(18\) must be divisible by num_heads \(4\)"),
        (dict(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
        (dict(positional="relative"), "positional must be one of"),
        (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\)"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(implementation="fast"), "implementation must be one of"),
        (dict(d_model=12, num_heads=4, positional="rope"), "positional='rope' needs an even"),
    ],
    ids=["d_model/heads", "kv heads", "positional", "dropout", "vocab", "activation",
         "implementation", "rope head dim"],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


@pytest.mark.usefixtures("unchecked")
def test_model_argument_errors():
    with pytest.raises(ValueError, match="cell must be one of"):
        fnn.RNNAttentionClassifier(VOCAB, 8, 12, 3, cell="rnn", rngs=rngs())
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        fnn.TransformerClassifier(tiny_config(), 0, rngs=rngs())
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        fnn.NadarayaWatson(learn_bandwidth=True, bandwidth=0.0, rngs=rngs())
    with pytest.raises(ValueError, match=r"tokens must be an int array \[B, T\]"):
        fnn.DecoderLM(tiny_config(), rngs=rngs())(jnp.ones((2, 3)))
    layer = fnn.TransformerDecoderLayer(16, 4, 32, rngs=rngs())
    with pytest.raises(ValueError, match="memory .* is required for cross-attention"):
        layer(normal(0, (1, 3, 16)))
