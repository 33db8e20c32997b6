"""MultiHeadAttention and the scored attention layers: shapes, jit/grad, interventions,
dropout, implementations and every configuration error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nn_testing import assert_close, assert_useful_grads, normal, rngs

import flaxattn
import flaxattn.nn as fnn


def mha(**kwargs) -> fnn.MultiHeadAttention:
    settings = dict(num_heads=4, in_features=16, num_kv_heads=2)
    return fnn.MultiHeadAttention(**{**settings, **kwargs}, rngs=rngs())


@pytest.mark.parametrize(
    "kwargs, q_shape, kv_shape, out_shape",
    [
        (dict(), (2, 5, 16), None, (2, 5, 16)),
        (dict(num_kv_heads=1, qkv_features=8, out_features=6), (2, 5, 16), None, (2, 5, 6)),
        (dict(in_kv_features=10, kind="cross"), (2, 3, 16), (2, 7, 10), (2, 3, 16)),
        (dict(normalize_qk=True, rope=True, use_bias=False), (1, 4, 16), None, (1, 4, 16)),
    ],
    ids=["self gqa", "mqa qkv=8 out=6", "cross S=7", "qk-norm rope no-bias"],
)
def test_shapes(kwargs, q_shape, kv_shape, out_shape):
    layer = mha(**kwargs)
    kv = None if kv_shape is None else normal(1, kv_shape)
    out = nnx.jit(lambda layer, q, kv: layer(q, kv))(layer, normal(0, q_shape), kv)
    assert out.shape == out_shape


def test_jit_and_grad():
    layer = mha(rope=True, normalize_qk=True)
    x = normal(0, (2, 5, 16))
    lengths = np.array([5, 3], np.int32)

    def loss(layer, x):
        out = layer(x, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        return jnp.sum(out**2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(layer, x)
    assert np.isfinite(value)
    assert_useful_grads(grads)
    assert np.abs(grads.query_ln.scale[...]).sum() > 0.0


def test_matches_an_independent_computation():
    """softmax(q kᵀ / sqrt(H)) v by hand from the layer's own projections, GQA included."""
    layer = mha(use_bias=True)
    x = normal(0, (2, 5, 16))

    def by_hand(layer, x):
        q = jnp.einsum("btf,fnh->btnh", x, layer.query.kernel[...]) + layer.query.bias[None, None]
        k = jnp.einsum("bsf,fkh->bskh", x, layer.key.kernel[...]) + layer.key.bias[None, None]
        v = jnp.einsum("bsf,fkh->bskh", x, layer.value.kernel[...]) + layer.value.bias[None, None]
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # G = N / K = 2
        causal = np.tril(np.ones((5, 5), bool))
        logits = jnp.where(
            causal[None, None], jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0, -jnp.inf
        )  # H=4
        heads = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)
        return (
            jnp.einsum("btnh,nhf->btf", heads, layer.out.kernel[...]) + layer.out.bias[None, None]
        )

    actual = nnx.jit(lambda lay, x: lay(x, is_causal=True))(layer, x)
    assert_close(actual, nnx.jit(by_hand)(layer, x))


@pytest.mark.parametrize("implementation", ["blocked", "xla"])
def test_implementations_agree(implementation):
    x = normal(0, (2, 6, 16))
    lengths = np.array([6, 4], np.int32)
    call = nnx.jit(lambda layer: layer(x, is_causal=True, key_value_seq_lengths=lengths))
    assert_close(call(mha(attention=implementation)), call(mha(attention="reference")))


def test_the_old_attention_knobs_still_work_with_a_deprecation_warning():
    x = normal(0, (2, 6, 16))
    with pytest.warns(DeprecationWarning, match=r"MultiHeadAttention\(implementation=\.\.\.\)"):
        old = mha(implementation="blocked")
    with pytest.warns(DeprecationWarning, match=r"MultiHeadAttention\(attention_fn=\.\.\.\)"):
        old_fn = mha(attention_fn=flaxattn.dot_product_attention)
    assert_close(old(x), mha(attention="blocked")(x))
    assert_close(old_fn(x), mha(attention=flaxattn.dot_product_attention)(x))
    with pytest.raises(ValueError, match="pass one of attention, implementation and attention_fn"):
        mha(attention="blocked", implementation="reference")


def test_head_mask_removes_exactly_one_heads_contribution():
    layer = mha()
    x = normal(0, (2, 5, 16))
    masks = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], bool)
    call = nnx.jit(lambda layer, masks: jax.vmap(lambda m: layer(x, head_mask=m))(masks))
    full, none, without_2, only_2 = call(layer, masks)
    assert_close(none, np.broadcast_to(layer.out.bias[...], none.shape))  # nothing but bias
    assert_close(full - without_2, only_2 - none)
    assert not np.allclose(full, without_2)


def test_head_scale_is_linear_in_each_head():
    layer = mha()
    x = normal(0, (1, 4, 16))
    scales = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 2, 1, 1], [0, 1, 0, 0]], np.float32)
    call = nnx.jit(lambda layer, scales: jax.vmap(lambda s: layer(x, head_scale=s))(scales))
    full, none, doubled, only_1 = call(layer, scales)
    assert_close(doubled - full, only_1 - none)


def test_head_interventions_reach_the_layers_inside_a_model():
    block = fnn.TransformerEncoderLayer(16, 4, 32, num_kv_heads=2, rngs=rngs())
    x = normal(0, (2, 5, 16))
    mask, scale = np.array([1, 0, 1, 1], bool), np.array([1.0, 1.0, 0.5, 2.0], np.float32)
    direct = nnx.jit(lambda m: m(x, head_mask=mask, head_scale=scale))(block)
    with fnn.head_interventions(
        block, masks={"self_attention": mask}, scales={"self_attention": scale}
    ):
        inside = nnx.jit(lambda m: m(x))(block)
    assert_close(inside, direct)
    assert block.self_attention.intervention is None
    assert not np.allclose(nnx.jit(lambda m: m(x))(block), direct)
    not_attention = pytest.raises(ValueError, match="'feed_forward' is not a MultiHeadAttention")
    with not_attention, fnn.head_interventions(block, masks={"feed_forward": mask}):
        pass
    wrong_size = pytest.raises(ValueError, match="must have num_heads=4 entries, got 3")
    with wrong_size, fnn.head_interventions(block, scales={"self_attention": [1.0, 1.0, 1.0]}):
        pass


def test_dropout_is_deterministic_for_the_same_rngs():
    call = nnx.jit(
        lambda layer, deterministic: layer(x, deterministic=deterministic), static_argnums=1
    )
    x = normal(0, (2, 5, 16))

    def run(seed, deterministic=False):
        layer = fnn.MultiHeadAttention(4, 16, dropout_rate=0.5, rngs=rngs(0, dropout=seed))
        return call(layer, deterministic)

    assert_close(run(1), run(1), atol=0, rtol=0)
    assert not np.allclose(run(1), run(2))
    assert_close(run(1, deterministic=True), run(2, deterministic=True), atol=0, rtol=0)


@pytest.mark.usefixtures("unchecked")
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mha(qkv_features=10), r"qkv_features \(10\) must be divisible by num_heads \(4\)"),
        (lambda: mha(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
        (lambda: mha(num_heads=0), "num_heads must be a positive int"),
        (lambda: mha(attention="fast"), "implementation must be one of"),
        (lambda: mha(kind="mixed"), "kind must be one of"),
        (lambda: mha(rope="yes"), "rope must be a RoPE"),
        (lambda: mha(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    ],
    ids=["features/heads", "kv heads", "zero heads", "implementation", "kind", "rope", "dropout"],
)
def test_configuration_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.usefixtures("unchecked")
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda lay, x: lay(x, mask=np.ones((2, 1, 3, 5), bool)), r"mask must be broadcastable"),
        (lambda lay, x: lay(x[..., :8]), r"inputs_q must have shape \[B, length, 16\]"),
        (lambda lay, x: lay(x, head_mask=np.ones(3, bool)), r"head_mask must have shape \[N\]"),
        (lambda lay, x: lay(x, head_scale=np.ones((4, 1))), r"head_scale must have shape \[N\]"),
        (lambda lay, x: lay(x, decode=True), "decode=True needs a KV cache: call init_cache"),
    ],
    ids=["mask shape", "features", "head_mask", "head_scale", "decode without cache"],
)
def test_call_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(mha(), normal(0, (2, 5, 16)))


def test_scored_attention_layers():
    query, keys, values = normal(0, (2, 3, 6)), normal(1, (2, 7, 5)), normal(2, (2, 7, 4))
    lengths = np.array([7, 2], np.int32)
    additive = fnn.AdditiveAttention(6, 5, 8, num_heads=2, rngs=rngs())
    general = fnn.MultiplicativeAttention(6, 5, rngs=rngs())

    def loss(layer):
        out = layer(query, keys, values, key_value_seq_lengths=lengths)
        return jnp.sum(out**2), out

    for layer, width in ((additive, 8), (general, 4)):
        (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer)
        assert out.shape == (2, 3, width)
        assert_useful_grads(grads)
    # Luong "general" by hand: softmax(q W kᵀ) v over the valid keys.
    logits = np.einsum("btd,de,bse->bts", query, np.asarray(general.weight[0]), keys)
    logits = np.where(np.arange(7) < lengths[:, None, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    assert_close(out, weights / weights.sum(-1, keepdims=True) @ values)
