"""The single-head kernel (`attention`, `attention_weights`, `attention_parts`) against numpy,
with biases, masks, score/mask modifiers and dropout."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flaxattn.kernels import (
    alibi_score_mod,
    and_masks,
    causal_mask_mod,
    cosine_score,
    document_mask_mod,
    general_score,
    masked_softmax,
    or_masks,
    prefix_lm_mask_mod,
    relative_bias_score_mod,
    soft_cap_score_mod,
)
from flaxattn.kernels import attention_weights as _attention_weights
from flaxattn.kernels import single_head_attention as _single_head_attention
from flaxattn.kernels._single_head import attention_parts as _attention_parts

TOL = dict(atol=2e-5, rtol=2e-5)


def _jitted(fn):
    """`fn(*arrays, **kwargs)` compiled once per call site: arrays are arguments, the keyword
    arguments (functions, rates, keys, masks) are closed over. Eager dispatch of the vmapped
    kernels costs several times the CPU time of one compilation."""
    return lambda *args, **kwargs: jax.jit(lambda *a: fn(*a, **kwargs))(*args)


attention_parts = _jitted(_attention_parts)
attention_weights = _jitted(_attention_weights)
single_head_attention = _jitted(_single_head_attention)


def np_head(q, k, v, *, logits=None, bias=None, mask=None):
    """One head in float64: softmax over visible keys (empty row -> 0 weights), then @ v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if logits is None:
        logits = q @ k.T / np.sqrt(q.shape[-1])
    logits = np.asarray(logits, np.float64)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    visible = np.broadcast_to(True if mask is None else np.asarray(mask), logits.shape)
    weights = np.zeros_like(logits)
    lse = np.full(logits.shape[0], -np.inf)
    for t in range(logits.shape[0]):
        row = logits[t][visible[t]]
        if row.size:
            e = np.exp(row - row.max())
            weights[t][visible[t]] = e / e.sum()
            lse[t] = row.max() + np.log(e.sum())
    return weights @ v, weights, lse


def qkv(rng, T, S, D, Dv=None):
    Dv = D if Dv is None else Dv
    return tuple(
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((T, D), (S, D), (S, Dv))
    )


@pytest.mark.parametrize("T,S,D,Dv", [(5, 7, 4, 3), (6, 6, 8, 8), (1, 9, 4, 4), (7, 1, 3, 2)])
def test_attention_parts_match_numpy(rng, T, S, D, Dv):
    q, k, v = qkv(rng, T, S, D, Dv)
    out, weights, lse = attention_parts(q, k, v)
    ref_out, ref_w, ref_lse = np_head(q, k, v)
    assert out.shape == (T, Dv) and weights.shape == (T, S) and lse.shape == (T,)
    assert weights.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(weights, ref_w, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    np.testing.assert_allclose(single_head_attention(q, k, v), ref_out, **TOL)
    np.testing.assert_allclose(attention_weights(q, k), ref_w, **TOL)
    np.testing.assert_allclose(jnp.sum(weights, -1), np.ones(T), atol=1e-6)


def test_hand_worked_two_keys():
    # Logits (scale 1) are [0, log 3]: weights [1/4, 3/4], output 1/4 * 4 + 3/4 * 8 = 7.
    q = jnp.array([[1.0]])
    k = jnp.array([[0.0], [np.log(3.0)]])
    v = jnp.array([[4.0], [8.0]])
    fn = partial(general_score, weight=jnp.eye(1))
    out, weights, lse = attention_parts(q, k, v, score_fn=fn)
    np.testing.assert_allclose(weights, [[0.25, 0.75]], atol=1e-6)
    np.testing.assert_allclose(out, [[7.0]], atol=1e-5)
    np.testing.assert_allclose(lse, [np.log(4.0)], atol=1e-6)


def test_other_score_functions(rng):
    q, k, v = qkv(rng, 4, 6, 3)
    w = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)
    qn, kn, wn = (np.asarray(x, np.float64) for x in (q, k, w))
    out = single_head_attention(q, k, v, score_fn=partial(general_score, weight=w))
    np.testing.assert_allclose(out, np_head(q, k, v, logits=qn @ wn @ kn.T)[0], atol=1e-4)
    cos = (qn / np.linalg.norm(qn, axis=-1, keepdims=True)) @ (
        kn / np.linalg.norm(kn, axis=-1, keepdims=True)
    ).T
    out = single_head_attention(q, k, v, score_fn=partial(cosine_score, temperature=0.2))
    np.testing.assert_allclose(out, np_head(q, k, v, logits=cos / 0.2)[0], atol=1e-4)


def test_bias_and_masks(rng):
    T, S = 5, 6
    q, k, v = qkv(rng, T, S, 4)
    bias = jnp.asarray(rng.standard_normal((T, S)), jnp.float32)
    mask = jnp.asarray(rng.random((T, S)) < 0.6).at[:, 0].set(True)
    out, weights, _ = attention_parts(q, k, v, bias=bias, mask=mask)
    ref_out, ref_w, _ = np_head(q, k, v, bias=bias, mask=mask)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(weights, ref_w, **TOL)
    assert np.all(np.asarray(weights)[~np.asarray(mask)] == 0.0)
    # Broadcast mask [1, S] and bias [T, 1] (a per-query bias changes nothing).
    col = jnp.asarray([True, False, True, True, False, True])[None]
    out, _, _ = attention_parts(q, k, v, bias=bias[:, :1], mask=col)
    np.testing.assert_allclose(out, np_head(q, k, v, mask=col)[0], **TOL)


def test_empty_rows_are_zero_with_finite_gradients(rng):
    q, k, v = qkv(rng, 4, 5, 3)
    mask = jnp.ones((4, 5), bool).at[1].set(False).at[3].set(False)
    out, weights, lse = attention_parts(q, k, v, mask=mask)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(weights[3], 0.0)
    lse = np.asarray(lse)
    assert np.isneginf(lse[1]) and np.isneginf(lse[3]) and np.all(np.isfinite(lse[[0, 2]]))
    np.testing.assert_allclose(out, np_head(q, k, v, mask=mask)[0], **TOL)

    def loss(q, k, v):
        return jnp.sum(single_head_attention(q, k, v, mask=mask) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_array_equal(grads[0][1], 0.0)  # an empty row has no gradient


def test_all_masked_and_all_minus_inf_rows():
    q = jnp.ones((2, 2))
    k = jnp.ones((3, 2))
    v = jnp.ones((3, 2))
    out, w, lse = attention_parts(q, k, v, mask=jnp.zeros((2, 3), bool))
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(w, 0.0)
    assert np.all(np.isneginf(lse))
    # A bias of -inf everywhere on a row also empties it (instead of giving NaN).
    bias = jnp.zeros((2, 3)).at[0].set(-jnp.inf).at[1, 0].set(-jnp.inf)
    out, w, lse = attention_parts(q, k, v, bias=bias)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(w[1], [0.0, 0.5, 0.5])
    assert np.isneginf(lse[0]) and np.isfinite(lse[1])


def test_masked_softmax_handles_zero_keys():
    w, lse = masked_softmax(jnp.zeros((3, 0)))
    assert w.shape == (3, 0) and np.all(np.isneginf(lse))


def test_score_mod_soft_cap(rng):
    q, k, v = qkv(rng, 4, 5, 3)
    q = q * 10  # large logits, so the cap matters
    bias = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    cap = 2.0
    out, weights, _ = attention_parts(q, k, v, bias=bias, score_mod=soft_cap_score_mod(cap))
    logits = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T / np.sqrt(3) + np.asarray(bias)
    ref_out, ref_w, _ = np_head(q, k, v, logits=cap * np.tanh(logits / cap))  # after the bias
    np.testing.assert_allclose(weights, ref_w, **TOL)
    np.testing.assert_allclose(out, ref_out, **TOL)


def test_score_mod_alibi_and_relative_bias(rng):
    T, S = 5, 7
    q, k, v = qkv(rng, T, S, 4)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    out = single_head_attention(q, k, v, score_mod=alibi_score_mod(0.25))
    np.testing.assert_allclose(out, np_head(q, k, v, bias=0.25 * (j - i))[0], **TOL)
    max_distance = 2
    table = jnp.asarray(rng.standard_normal(2 * max_distance + 1), jnp.float32)
    out = single_head_attention(q, k, v, score_mod=relative_bias_score_mod(table, max_distance))
    rel = np.clip(j - i, -max_distance, max_distance) + max_distance
    np.testing.assert_allclose(out, np_head(q, k, v, bias=np.asarray(table)[rel])[0], **TOL)


def test_mask_mods(rng):
    T = S = 6
    q, k, v = qkv(rng, T, S, 4)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    doc = jnp.array([0, 0, 0, 1, 1, 2])
    cases = {
        "causal": (causal_mask_mod, j <= i),
        "prefix-lm": (or_masks(prefix_lm_mask_mod(3), causal_mask_mod), (j < 3) | (j <= i)),
        "document": (document_mask_mod(doc), np.asarray(doc)[:, None] == np.asarray(doc)[None]),
        "causal document": (
            and_masks(causal_mask_mod, document_mask_mod(doc)),
            (j <= i) & (np.asarray(doc)[:, None] == np.asarray(doc)[None]),
        ),
    }
    for name, (mod, dense) in cases.items():
        out, weights, _ = attention_parts(q, k, v, mask_mod=mod)
        ref_out, ref_w, _ = np_head(q, k, v, mask=dense)
        np.testing.assert_allclose(weights, ref_w, **TOL, err_msg=name)
        np.testing.assert_allclose(out, ref_out, **TOL, err_msg=name)
    # mask and mask_mod combine by "and".
    mask = jnp.asarray(rng.random((T, S)) < 0.7)
    w = attention_weights(q, k, mask=mask, mask_mod=causal_mask_mod)
    np.testing.assert_allclose(w, np_head(q, k, v, mask=np.asarray(mask) & (j <= i))[1], **TOL)


def test_document_mask_mod_with_separate_key_ids(rng):
    q, k, v = qkv(rng, 3, 5, 2)
    q_doc, kv_doc = jnp.array([0, 1, 1]), jnp.array([0, 0, 1, 1, 1])
    w = attention_weights(q, k, mask_mod=document_mask_mod(q_doc, kv_doc))
    dense = np.asarray(q_doc)[:, None] == np.asarray(kv_doc)[None]
    np.testing.assert_allclose(w, np_head(q, k, v, mask=dense)[1], **TOL)


class TestDropout:
    def _qkv(self, rng):
        return qkv(rng, 4, 6, 3)

    def test_rate_zero_is_identity(self, rng, prng_key):
        q, k, v = self._qkv(rng)
        plain = attention_parts(q, k, v)
        zero = attention_parts(q, k, v, dropout_rate=0.0, dropout_key=prng_key)
        for a, b in zip(plain, zero, strict=True):
            np.testing.assert_array_equal(a, b)

    def test_same_key_same_result_different_key_different(self, rng):
        q, k, v = self._qkv(rng)
        run = lambda key: attention_parts(q, k, v, dropout_rate=0.5, dropout_key=key)
        a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[1], c[1])
        # Legacy uint32 keys work too.
        legacy = attention_parts(q, k, v, dropout_rate=0.5, dropout_key=jax.random.PRNGKey(1))
        assert legacy[0].shape == a[0].shape

    def test_kept_weights_are_rescaled_and_output_consistent(self, rng, prng_key):
        q, k, v = self._qkv(rng)
        rate = 0.25
        out, weights, _ = attention_parts(q, k, v, dropout_rate=rate, dropout_key=prng_key)
        clean = np.asarray(attention_weights(q, k))
        kept = np.asarray(weights) != 0
        np.testing.assert_allclose(np.asarray(weights)[kept], clean[kept] / (1 - rate), **TOL)
        np.testing.assert_allclose(out, np.asarray(weights) @ np.asarray(v), **TOL)

    def test_expected_value(self, rng):
        q, k, v = self._qkv(rng)
        rate, n = 0.3, 4000
        keys = jax.random.split(jax.random.key(7), n)
        run = jax.jit(
            jax.vmap(lambda key: _attention_parts(q, k, v, dropout_rate=rate, dropout_key=key)[:2])
        )
        outs, weights = run(keys)
        clean_out, clean_w, _ = attention_parts(q, k, v)
        # Inverted dropout is unbiased: E[weights] = weights, E[out] = out.
        np.testing.assert_allclose(jnp.mean(weights, 0), clean_w, atol=0.03)
        np.testing.assert_allclose(jnp.mean(outs, 0), clean_out, atol=0.05)
        # About `rate` of the weights are dropped.
        assert abs(float(jnp.mean(weights == 0)) - rate) < 0.02


@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 2e-2), (jnp.float16, 3e-3)])
def test_low_precision_inputs(rng, dtype, atol):
    q, k, v = (x.astype(dtype) for x in qkv(rng, 5, 7, 4))
    out, weights, lse = attention_parts(q, k, v)
    assert out.dtype == dtype and weights.dtype == jnp.float32 and lse.dtype == jnp.float32
    ref_out, ref_w, _ = np_head(*(np.asarray(x, np.float64) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=atol, rtol=atol)
    np.testing.assert_allclose(weights, ref_w, atol=1e-4)  # float32 from the rounded inputs


def test_jit_vmap_and_gradients(rng):
    q, k, v = qkv(rng, 4, 5, 3)
    bias = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32) * 0.5
    kw = dict(mask_mod=or_masks(prefix_lm_mask_mod(2), causal_mask_mod))
    f = partial(_single_head_attention, **kw)
    np.testing.assert_allclose(jax.jit(f)(q, k, v, bias=bias), f(q, k, v, bias=bias), **TOL)
    # vmap over heads equals a loop.
    qs, ks, vs = (jnp.stack([x, 2 * x, -x], axis=1) for x in (q, k, v))
    many = jax.vmap(f, in_axes=1, out_axes=1)(qs, ks, vs)
    for h in range(3):
        np.testing.assert_allclose(many[:, h], f(qs[:, h], ks[:, h], vs[:, h]), **TOL)
    check_grads(
        jax.jit(lambda q, k, v, b: f(q, k, v, bias=b)), (q, k, v, bias), order=1, modes=["rev"],
        eps=1e-3, atol=1e-2, rtol=1e-2,
    )
    cosine = partial(cosine_score, temperature=0.5)
    check_grads(
        jax.jit(lambda q, k: _single_head_attention(q, k, v, score_fn=cosine)), (q, k), order=1,
        modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2,
    )
