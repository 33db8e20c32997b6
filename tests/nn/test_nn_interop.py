"""Interop with flax: flaxattn as the attention_fn of flax.nnx / flax.linen multi-head
attention, and weight conversion from flax.nnx.MultiHeadAttention."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen, nnx
from nn_testing import assert_close, normal, rngs

import flaxattn.nn as fnn

X, KV = normal(0, (2, 5, 16)), normal(1, (2, 7, 16))
MASK = np.random.default_rng(2).random((2, 1, 5, 7)) < 0.7
MASK[..., 0] = True  # no fully-masked row, where flax averages and flaxattn gives 0


def _nnx_pair(**kwargs):
    make = lambda **extra: nnx.MultiHeadAttention(
        4, 16, num_kv_heads=2, decode=False, rngs=rngs(), **kwargs, **extra
    )
    return make(), make(attention_fn=fnn.flax_attention_fn())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, **kw: m(X, KV, mask=MASK, **kw),
        lambda m, **kw: m(X, is_causal=True, **kw),
    ],
    ids=["cross with mask", "self causal"],
)
def test_flax_nnx_attention_fn(call):
    @nnx.jit
    def run(m):
        sow = lambda m: call(m, sow_weights=True)  # flax passes `module`: weights are sown
        sown, state = nnx.capture(sow, nnx.Intermediate)(m)
        return call(m), sown, state["attention_weights"].get_value()[0]

    flax_mha, ours = _nnx_pair(normalize_qk=True)
    for actual, expected in zip(run(ours), run(flax_mha), strict=True):
        assert_close(actual, expected)


def test_flax_nnx_attention_fn_dropout_is_keyed_by_flax_rngs():
    make = lambda seed: nnx.MultiHeadAttention(
        4, 16, dropout_rate=0.5, attention_fn=fnn.flax_attention_fn(), decode=False,
        rngs=rngs(0, dropout=seed),
    )
    run = lambda m: m(X, deterministic=False)
    assert_close(run(make(1)), run(make(1)), atol=0, rtol=0)
    assert not np.allclose(run(make(1)), run(make(2)))


def test_flax_linen_attention_fn():
    kwargs = dict(num_heads=4, qkv_features=16)
    flax_mha = linen.MultiHeadDotProductAttention(**kwargs)
    ours = linen.MultiHeadDotProductAttention(**kwargs, attention_fn=fnn.flax_attention_fn())
    params = flax_mha.init(jax.random.key(0), X, KV)
    expected = flax_mha.apply(params, X, KV, mask=MASK)
    assert_close(ours.apply(params, X, KV, mask=MASK), expected)
    out, state = ours.apply(params, X, KV, mask=MASK, sow_weights=True, mutable=["intermediates"])
    assert_close(out, expected)
    assert state["intermediates"]["attention_weights"][0].shape == (2, 4, 5, 7)
    # Extra batch dimensions, as flax allows.
    extra = lambda m: m.apply(params, X[None], KV[None], mask=MASK[None])
    assert_close(extra(ours), extra(flax_mha))


def test_from_flax_nnx_gives_the_same_outputs():
    flax_mha = nnx.MultiHeadAttention(4, 16, num_kv_heads=2, qkv_features=8, out_features=12,
                                      normalize_qk=True, decode=False, rngs=rngs(3))
    ours = fnn.from_flax_nnx(flax_mha, rngs=rngs())
    assert isinstance(ours, fnn.MultiHeadAttention)
    run = nnx.jit(lambda m: (m(X, KV, mask=MASK), m(X, is_causal=True)))
    expected = run(flax_mha)
    for actual, want in zip(run(ours), expected, strict=True):
        assert_close(actual, want)
    ours.query.kernel[...] = ours.query.kernel[...] * 2.0  # a copy, not shared arrays
    assert not np.allclose(run(ours)[1], expected[1])


def test_interop_errors():
    with pytest.raises(TypeError, match="mha must be a flax.nnx.MultiHeadAttention"):
        fnn.from_flax_nnx(fnn.MultiHeadAttention(4, 16, rngs=rngs()), rngs=rngs())
    attention_fn = fnn.flax_attention_fn()
    q = normal(0, (1, 3, 2, 4))
    with pytest.raises(ValueError, match="does not support custom einsums"):
        attention_fn(q, q, q, qk_attn_weights_einsum=lambda *a: a)
