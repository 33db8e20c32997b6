"""Score functions against their formulas, written here in numpy, and hand-worked values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.kernels import (
    additive_score,
    cosine_score,
    dot_product_score,
    general_score,
    scaled_dot_product_score,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _np(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("T,S,D", [(3, 5, 4), (1, 1, 1), (7, 2, 3)])
def test_dot_product_score_matches_formula(rng, T, S, D):
    q, k = rng.standard_normal((T, D)), rng.standard_normal((S, D))
    got = dot_product_score(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
    assert got.shape == (T, S) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, q @ k.T, **TOL)


def test_dot_product_score_hand_worked():
    q = jnp.array([[1.0, 2.0]])
    k = jnp.array([[3.0, 4.0], [-1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(dot_product_score(q, k), [[11.0, -1.0, 0.0]])


def test_scaled_dot_product_score_default_and_override(rng):
    q, k = rng.standard_normal((4, 9)), rng.standard_normal((6, 9))
    qj, kj = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    np.testing.assert_allclose(scaled_dot_product_score(qj, kj), q @ k.T / 3.0, **TOL)
    np.testing.assert_allclose(scaled_dot_product_score(qj, kj, scale=0.25), q @ k.T / 4, **TOL)
    np.testing.assert_allclose(scaled_dot_product_score(qj, kj, 2.0), 2 * q @ k.T, **TOL)


def test_scaled_dot_product_score_hand_worked():
    # D = 4, so the default scale is 1/2: (1+1+1+1) / 2 = 2; (1-1+1-1) / 2 = 0.
    q = jnp.ones((1, 4))
    k = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]])
    np.testing.assert_allclose(scaled_dot_product_score(q, k), [[2.0, 0.0]])
    np.testing.assert_allclose(scaled_dot_product_score(q, k, scale=1.0), [[4.0, 0.0]])


@pytest.mark.parametrize("T,S,D,E", [(3, 5, 4, 6), (1, 1, 2, 2), (5, 3, 3, 1)])
def test_general_score_matches_formula(rng, T, S, D, E):
    q, k, w = rng.standard_normal((T, D)), rng.standard_normal((S, E)), rng.standard_normal((D, E))
    got = general_score(*(jnp.asarray(x, jnp.float32) for x in (q, k, w)))
    assert got.shape == (T, S) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, q @ w @ k.T, **TOL)


def test_general_score_hand_worked():
    # q W = [1, 0] [[1, 2], [3, 4]] = [1, 2]; then . [0, 1] = 2 and . [1, 1] = 3.
    q = jnp.array([[1.0, 0.0]])
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    k = jnp.array([[0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(general_score(q, k, w), [[2.0, 3.0]])
    # With W = I it is the dot product.
    np.testing.assert_allclose(general_score(q, k, jnp.eye(2)), dot_product_score(q, k))


@pytest.mark.parametrize("T,S,D,E,A", [(3, 5, 4, 6, 7), (1, 1, 1, 1, 1), (4, 2, 3, 3, 2)])
def test_additive_score_matches_formula(rng, T, S, D, E, A):
    q, k = rng.standard_normal((T, D)), rng.standard_normal((S, E))
    wq, wk, v = rng.standard_normal((D, A)), rng.standard_normal((E, A)), rng.standard_normal(A)
    got = additive_score(*(jnp.asarray(x, jnp.float32) for x in (q, k, wq, wk, v)))
    assert got.shape == (T, S) and got.dtype == jnp.float32
    expected = np.zeros((T, S))
    for t in range(T):
        for s in range(S):
            expected[t, s] = v @ np.tanh(wq.T @ q[t] + wk.T @ k[s])
    np.testing.assert_allclose(got, expected, **TOL)


def test_additive_score_hand_worked():
    # 3 * tanh(1 * 0.5 + 2 * 0.25) = 3 tanh(1); and 3 * tanh(0.5 - 0.5) = 0.
    q = jnp.array([[0.5]])
    k = jnp.array([[0.25], [-0.25]])
    got = additive_score(q, k, jnp.array([[1.0]]), jnp.array([[2.0]]), jnp.array([3.0]))
    np.testing.assert_allclose(got, [[3 * math.tanh(1.0), 0.0]], atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.1, 2.5])
def test_cosine_score_matches_formula(rng, temperature):
    q, k = rng.standard_normal((4, 5)), rng.standard_normal((3, 5))
    got = cosine_score(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), temperature)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, qn @ kn.T / temperature, rtol=1e-5, atol=1e-5 / temperature)
    assert np.all(np.abs(np.asarray(got)) <= 1.0 / temperature + 1e-5)


def test_cosine_score_hand_worked():
    q = jnp.array([[3.0, 4.0]])
    k = jnp.array([[6.0, 8.0], [-4.0, 3.0], [-0.3, -0.4], [0.0, 0.0]])
    # parallel -> 1, orthogonal -> 0, opposite -> -1, zero vector -> 0 (finite thanks to eps).
    np.testing.assert_allclose(cosine_score(q, k), [[1.0, 0.0, -1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(
        cosine_score(q, k, temperature=0.5), [[2.0, 0.0, -2.0, 0.0]], atol=1e-6
    )
    # Invariant to the norms of q and k.
    np.testing.assert_allclose(cosine_score(7 * q, 0.1 * k), cosine_score(q, k), atol=1e-6)


def test_cosine_score_zero_vectors_have_finite_gradients():
    q = jnp.zeros((2, 3))
    k = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    g = jax.grad(lambda q, k: cosine_score(q, k).sum(), argnums=(0, 1))(q, k)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_scores_take_low_precision_inputs_and_return_float32(rng, dtype):
    q = jnp.asarray(rng.standard_normal((3, 4)), dtype)
    k = jnp.asarray(rng.standard_normal((5, 4)), dtype)
    w = jnp.asarray(rng.standard_normal((4, 4)), dtype)
    a = jnp.asarray(rng.standard_normal((4, 2)), dtype)
    e = jnp.asarray(rng.standard_normal(2), dtype)
    outs = [
        dot_product_score(q, k),
        scaled_dot_product_score(q, k),
        general_score(q, k, w),
        additive_score(q, k, a, a, e),
        cosine_score(q, k, 0.5),
    ]
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for out in outs:
        assert out.dtype == jnp.float32 and out.shape == (3, 5)
    # The products of the rounded inputs are accumulated in float32.
    np.testing.assert_allclose(outs[0], q64 @ k64.T, atol=1e-4, rtol=1e-4)


def test_scores_under_jit_and_grad(rng):
    q = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
    np.testing.assert_allclose(jax.jit(general_score)(q, k, w), general_score(q, k, w), **TOL)
    # d/dq sum(q W kᵀ) = sum_s W k_s, for every query row.
    g = jax.grad(lambda q: general_score(q, k, w).sum())(q)
    expected = np.broadcast_to(np.asarray(w) @ np.asarray(k).sum(0), (3, 4))
    np.testing.assert_allclose(g, expected, atol=1e-4, rtol=1e-4)
