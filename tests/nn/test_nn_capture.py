"""capture_attention: outputs unchanged, weights are distributions over the visible keys and
match an independent softmax(q kᵀ), selection of layers / heads / top-k, kinds, jit."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from nn_testing import assert_close, normal, rngs, tiny_config, tokens

import flaxattn.nn as fnn

SRC_LENGTHS = np.array([5, 3], np.int32)
TGT_LENGTHS = np.array([6, 4], np.int32)


@pytest.fixture(scope="module")
def seq2seq():
    """A 1 + 2 layer encoder-decoder, its inputs, its output and its full capture."""
    model = fnn.EncoderDecoderTransformer(tiny_config(num_layers=2, num_encoder_layers=1),
                                          rngs=rngs())
    args = (tokens(0, (2, 5)), tokens(1, (2, 6)))
    kwargs = dict(src_lengths=SRC_LENGTHS, tgt_lengths=TGT_LENGTHS)
    output = nnx.jit(lambda m: m(*args, **kwargs))(model)
    captured = nnx.jit(lambda m: fnn.capture_attention(m, *args, **kwargs))(model)
    return model, args, kwargs, output, captured


def test_capture_keeps_outputs_and_finds_every_layer(seq2seq):
    model, _, _, output, (out, weights) = seq2seq
    assert_close(out, output, atol=0, rtol=0)
    assert weights.kinds == {
        "encoder/layers/0/self_attention": "self",
        "decoder/layers/0/self_attention": "self",
        "decoder/layers/0/cross_attention": "cross",
        "decoder/layers/1/self_attention": "self",
        "decoder/layers/1/cross_attention": "cross",
    }
    assert fnn.attention_kinds(model) == weights.kinds
    assert all(layer.capture is None for layer in fnn.attention_layers(model).values())
    shapes = {"self": (2, 4, 6, 6), "cross": (2, 4, 6, 5)}
    assert weights["encoder/layers/0/self_attention"].shape == (2, 4, 5, 5)
    for path, w in weights.items():
        if path.startswith("decoder"):
            assert w.shape == shapes[weights.kinds[path]], path
        assert w.dtype == np.float32
    # Rows sum to 1 over the visible keys, and to 0 for padded queries.
    cross = np.asarray(weights["decoder/layers/1/cross_attention"])
    assert_close(cross[0].sum(-1), np.ones((4, 6)))
    assert_close(cross[1, :, :4].sum(-1), np.ones((4, 4)))
    assert np.all(cross[1, :, 4:] == 0) and np.all(cross[1, :, :, 3:] == 0)  # lengths
    self_w = np.asarray(weights["decoder/layers/0/self_attention"])
    assert np.all(np.triu(self_w[0], k=1) == 0)  # causal


def test_captured_weights_match_an_independent_softmax():
    """One layer by hand: softmax(q kᵀ / sqrt(H)) from its own projections (GQA, RoPE)."""
    layer = fnn.MultiHeadAttention(4, 16, num_kv_heads=2, rope=True, rngs=rngs())
    x = normal(0, (2, 5, 16))
    _, weights = fnn.capture_attention(layer, x, is_causal=True)

    def project(module, positions):
        y = np.einsum("btf,fnh->btnh", x, module.kernel[...]) + np.asarray(module.bias[...])
        return np.asarray(fnn.apply_rope(y, positions, fnn.RoPE()))

    q, k = project(layer.query, np.arange(5)), project(layer.key, np.arange(5))
    k = np.repeat(k, 2, axis=2)  # kv head n // 2 serves query head n
    logits = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
    logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    assert_close(weights[""], expected / expected.sum(-1, keepdims=True))


def test_layer_head_and_top_k_selection(seq2seq):
    model, args, kwargs, _, (_, full) = seq2seq
    path = "decoder/layers/1/cross_attention"
    _, chosen = fnn.capture_attention(
        model, *args, layers=["decoder/layers/*/cross_attention"], heads=[3, 0], **kwargs
    )
    assert sorted(chosen) == ["decoder/layers/0/cross_attention", path]
    assert_close(chosen[path], np.asarray(full[path])[:, [3, 0]])
    _, top = fnn.capture_attention(model, *args, layers=[path], heads=[1], top_k=2, **kwargs)
    values, indices = top[path]
    assert values.shape == indices.shape == (2, 1, 6, 2)
    expected = np.sort(np.asarray(full[path])[:, [1]], axis=-1)[..., ::-1][..., :2]
    assert_close(values, expected)
    assert_close(np.take_along_axis(np.asarray(full[path])[:, [1]], indices, -1), values)


@pytest.mark.parametrize("implementation", ["blocked", "xla"])
def test_capture_is_the_same_for_every_implementation(implementation):
    x = normal(0, (2, 6, 16))
    lengths = np.array([6, 3], np.int32)
    kwargs = dict(is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    results = {
        name: fnn.capture_attention(
            fnn.MultiHeadAttention(4, 16, attention=name, rngs=rngs()), x, **kwargs
        )
        for name in ("reference", implementation)
    }
    (out_ref, w_ref), (out, w) = results.values()
    assert_close(out, out_ref)
    assert_close(w[""], w_ref[""])


def test_capture_rnn_models_and_bound_methods(seq2seq):
    bahdanau = fnn.BahdanauSeq2Seq(11, 13, 8, 12, rngs=rngs())
    src, tgt = tokens(0, (2, 5), vocab=11), tokens(1, (2, 4))
    run = nnx.jit(lambda m: (m(src, SRC_LENGTHS, tgt),
                             fnn.capture_attention(m, src, SRC_LENGTHS, tgt)))
    expected, (out, weights) = run(bahdanau)
    assert_close(out, expected, atol=0, rtol=0)
    assert weights.kinds == {"attention": "cross"}
    assert weights["attention"].shape == (2, 1, 4, 5)
    assert_close(np.asarray(weights["attention"]).sum(-1), np.ones((2, 1, 4)))
    assert np.all(np.asarray(weights["attention"])[1, :, :, 3:] == 0)
    model, args, _, _, (_, full) = seq2seq
    memory, encoder = fnn.capture_attention(model.encode, args[0], src_lengths=SRC_LENGTHS)
    assert list(encoder) == ["encoder/layers/0/self_attention"]
    assert_close(encoder["encoder/layers/0/self_attention"],
                 full["encoder/layers/0/self_attention"])
    assert memory.shape == (2, 5, 16)


def test_capture_errors(seq2seq):
    model, args, kwargs, _, _ = seq2seq
    with pytest.raises(ValueError, match="layers: 'decoder/cross' matches no attention layer"):
        fnn.capture_attention(model, *args, layers=["decoder/cross"], **kwargs)
    with pytest.raises(ValueError, match=r"heads: \[4\] out of range .* num_heads=4"):
        fnn.capture_attention(model, *args, heads=[4], **kwargs)
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds the number of keys S=5"):
        fnn.capture_attention(model, *args, layers=["encoder/*"], top_k=9, **kwargs)
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        fnn.capture_attention(lambda x: x, 1)
    assert all(layer.capture is None for layer in fnn.attention_layers(model).values())
