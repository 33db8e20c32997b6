"""Mask and bias helpers against hand-written expectations and numpy formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxattn
from flaxattn.kernels import (
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    causal_mask,
    combine_masks,
    padding_mask,
    relative_position_buckets,
    t5_relative_bias,
    window_mask,
)


def test_causal_mask_top_left_and_bottom_right():
    expected_top_left = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
        ],
        bool,
    )
    expected_bottom_right = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(causal_mask(3, 5), expected_top_left)
    np.testing.assert_array_equal(causal_mask(3, 5, "bottom_right"), expected_bottom_right)
    np.testing.assert_array_equal(causal_mask(4), np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(causal_mask(4, 4, "bottom_right"), np.tril(np.ones((4, 4))))
    # T > S bottom-right: the first T - S queries see nothing.
    np.testing.assert_array_equal(
        causal_mask(4, 2, "bottom_right"), [[0, 0], [0, 0], [1, 0], [1, 1]]
    )


def test_window_mask():
    # Query p sees keys in [p - left, p + right].
    np.testing.assert_array_equal(
        window_mask(4, 4, (1, 0)),
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
    )
    np.testing.assert_array_equal(
        window_mask(3, 5, 1),
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]],
    )
    np.testing.assert_array_equal(
        window_mask(2, 5, (1, 0), "bottom_right"),  # queries at positions 3 and 4
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
    )
    i, j = np.arange(6)[:, None], np.arange(8)[None]
    np.testing.assert_array_equal(window_mask(6, 8, (2, 3)), (j >= i - 2) & (j <= i + 3))
    with pytest.raises(ValueError, match="local_window_size"):
        window_mask(3, 3, (-1, 0))


def test_padding_mask():
    q_len, kv_len = jnp.array([2, 3]), jnp.array([1, 4])
    m = padding_mask(q_len, kv_len, 3, 4)
    assert m.shape == (2, 1, 3, 4) and m.dtype == jnp.bool_
    expected = np.zeros((2, 1, 3, 4), bool)
    expected[0, 0, :2, :1] = True
    expected[1, 0, :3, :4] = True
    np.testing.assert_array_equal(m, expected)
    only_kv = padding_mask(None, kv_len, 2, 4)
    np.testing.assert_array_equal(only_kv[:, 0, 0], [[1, 0, 0, 0], [1, 1, 1, 1]])
    only_q = padding_mask(q_len, None, 3, 2)
    np.testing.assert_array_equal(only_q[:, 0, :, 0], [[1, 1, 0], [1, 1, 1]])
    assert padding_mask(None, None, 2, 3).shape == (1, 1, 2, 3)


def test_padding_mask_equals_lengths_arguments(rng, oracle):
    q, k, v = oracle.qkv(rng, 2, 4, 5, 2, 2, 4)
    q_len, kv_len = jnp.array([3, 4], jnp.int32), jnp.array([5, 2], jnp.int32)
    f = jax.jit(flaxattn.dot_product_attention)
    a = f(q, k, v, mask=padding_mask(q_len, kv_len, 4, 5))
    b = f(q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_combine_masks():
    a = jnp.array([[True, False, True]])
    b = jnp.array([[True], [False]])
    np.testing.assert_array_equal(combine_masks(a, None, b), [[1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(combine_masks(None, a), a)
    assert combine_masks(None, None) is None
    assert combine_masks() is None
    m = combine_masks(causal_mask(3), window_mask(3, 3, (1, 0)))
    np.testing.assert_array_equal(m, [[1, 0, 0], [1, 1, 0], [0, 1, 1]])


def test_alibi_slopes_power_of_two():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    np.testing.assert_allclose(alibi_slopes(1), [2.0**-8])
    assert alibi_slopes(16).shape == (16,)
    np.testing.assert_allclose(alibi_slopes(16)[:2], [2.0**-0.5, 2.0**-1])


def _paper_slopes(n: int) -> list[float]:
    """ALiBi's reference code (Press et al., github.com/ofirpress/attention_with_linear_biases)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_the_paper(n):
    np.testing.assert_allclose(alibi_slopes(n), _paper_slopes(n), rtol=1e-6)


def test_alibi_slopes_non_power_of_two_by_hand():
    # 6 heads: the 4-head slopes, then every other of the 8-head slopes (2^-1, 2^-3).
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    np.testing.assert_allclose(alibi_slopes(6), expected)


def test_alibi_bias():
    N, T, S = 4, 3, 5
    slopes = np.asarray(alibi_slopes(N))
    i, j = np.arange(T)[:, None], np.arange(S)[None]
    b = alibi_bias(N, T, S)
    assert b.shape == (1, N, T, S) and b.dtype == jnp.float32
    np.testing.assert_allclose(b[0], -slopes[:, None, None] * (i - j))
    np.testing.assert_allclose(
        alibi_bias(N, T, S, symmetric=True)[0], -slopes[:, None, None] * np.abs(i - j)
    )
    np.testing.assert_allclose(
        alibi_bias(N, T, S, offset=S - T)[0], -slopes[:, None, None] * (i + S - T - j)
    )
    assert alibi_bias(N, 4).shape == (1, N, 4, 4)
    # alibi_score_mod adds the same slope * (kv_idx - q_idx) for one head.
    score = alibi_score_mod(float(slopes[1]))(jnp.zeros((T, S)), jnp.asarray(i), jnp.asarray(j))
    np.testing.assert_allclose(score, b[0, 1])


def test_alibi_bias_through_attention_equals_score_mod(rng, oracle):
    N, T = 2, 5
    q, k, v = oracle.qkv(rng, 1, T, T, N, N, 4)
    f = jax.jit(flaxattn.dot_product_attention, static_argnames="is_causal")
    with_bias = f(q, k, v, alibi_bias(N, T), is_causal=True)
    for n, slope in enumerate(np.asarray(alibi_slopes(N))):
        g = jax.jit(lambda q, k, v, slope=float(slope): flaxattn.dot_product_attention(
            q, k, v, is_causal=True, score_mod=alibi_score_mod(slope)))
        np.testing.assert_allclose(
            with_bias[:, :, n], g(q[:, :, n:n + 1], k[:, :, n:n + 1], v[:, :, n:n + 1])[:, :, 0],
            atol=1e-5, rtol=1e-5,
        )


def _np_t5_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's `_relative_position_bucket` for one `key_pos - query_pos`, in plain Python."""
    bucket = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(
        np.float32(
            np.log(np.float32(n) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    )
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance",
    [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 16, 50)],
)
def test_relative_position_buckets_match_t5(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    got = np.asarray(
        relative_position_buckets(
            jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
            max_distance=max_distance,
        )
    )
    expected = [_np_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() <= num_buckets - 1


def test_relative_position_buckets_by_hand():
    buckets = lambda rel, **kw: np.asarray(relative_position_buckets(jnp.asarray(rel), **kw))
    # Bidirectional, 32 buckets: keys before the query use 0..15, after it 16..31.
    np.testing.assert_array_equal(buckets([0, -1, -7, 1, 7]), [0, 1, 7, 17, 23])
    np.testing.assert_array_equal(buckets([-128, -1000, 128, 1000]), [15, 15, 31, 31])
    # 8 exact buckets, then log-spaced: distance 8 -> 8, 12 -> 8 + int(log(1.5)/log(16) * 8) = 9.
    np.testing.assert_array_equal(buckets([-8, -12, -16]), [8, 9, 10])
    # Causal: keys after the query all share bucket 0.
    np.testing.assert_array_equal(
        buckets([5, 0, -5, -1000], bidirectional=False), [0, 0, 5, 31]
    )


def test_t5_relative_bias(rng):
    R, N, T, S = 8, 3, 4, 6
    table = jnp.asarray(rng.standard_normal((R, N)), jnp.float32)
    for offset, bidirectional in [(0, True), (2, False)]:
        b = t5_relative_bias(
            table, T, S, bidirectional=bidirectional, max_distance=10, offset=offset
        )
        assert b.shape == (1, N, T, S)
        for i in range(T):
            for j in range(S):
                bucket = _np_t5_bucket(j - (i + offset), bidirectional, R, 10)
                np.testing.assert_allclose(b[0, :, i, j], table[bucket], err_msg=f"{i},{j}")
    assert t5_relative_bias(table, T).shape == (1, N, T, T)
