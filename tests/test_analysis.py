"""flaxattn.analysis against values worked out by hand."""

import math

import numpy as np
import pytest

from flaxattn import analysis


def w4(*rows_per_head):
    """[1, N, T, S] from per-head lists of rows."""
    return np.array([rows_per_head], dtype=np.float64)


def test_entropy_by_hand():
    # head 0: one-hot row (0) and uniform over 2 keys (ln 2); head 1: uniform over 4 (ln 4).
    w = w4(
        [[1, 0, 0, 0], [0.5, 0.5, 0, 0]],
        [[0.25] * 4, [0.25] * 4],
    )
    h = analysis.head_entropy(w)
    np.testing.assert_allclose(h, [math.log(2) / 2, math.log(4)])
    np.testing.assert_allclose(analysis.head_entropy(w, unit="bits"), [0.5, 2.0])


def test_entropy_ignores_padding_and_renormalises_over_valid_keys():
    # Query 1 is padding; key 3 is padding and its weight is dropped before renormalising.
    w = w4([[0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0]])
    h = analysis.head_entropy(w, query_lengths=[1], key_lengths=[3])
    np.testing.assert_allclose(h, [math.log(3)])
    per_ex = analysis.head_entropy(w, query_lengths=[1], key_lengths=[3], per_example=True)
    assert per_ex.shape == (1, 1)


def test_entropy_with_explicit_mask_and_no_valid_rows():
    w = w4([[1, 0], [0.5, 0.5]])
    causal = np.tril(np.ones((2, 2), bool))
    np.testing.assert_allclose(analysis.head_entropy(w, mask=causal), [math.log(2) / 2])
    assert np.isnan(analysis.head_entropy(w, query_lengths=[0])).all()


def test_mean_distance_by_hand():
    w = w4([[1, 0, 0], [0.5, 0, 0.5], [0, 0, 1]])
    # rows: 0, 0.5*1 + 0.5*1 = 1, |2-2| = 0 -> mean 1/3
    np.testing.assert_allclose(analysis.mean_attention_distance(w), [1 / 3])
    # Cross attention with the queries at key positions 1, 2, 3 (offset 1): rows give
    # |1-0| = 1, 0.5*|2-0| + 0.5*|2-2| = 1, |3-2| = 1.
    np.testing.assert_allclose(analysis.mean_attention_distance(w, query_offset=1), [1.0])
    np.testing.assert_allclose(
        analysis.mean_attention_distance(w, query_offset=[1], key_offset=[1]), [1 / 3]
    )


def test_sink_mass_by_hand():
    w = w4([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], [[0, 1, 0], [0, 0, 1], [0, 0, 1]])
    np.testing.assert_allclose(analysis.sink_mass(w), [(1 + 0.5 + 0.2) / 3, 0.0])
    np.testing.assert_allclose(analysis.sink_mass(w, sink_index=2), [0.5 / 3, 2 / 3])
    np.testing.assert_allclose(analysis.sink_mass(w, query_lengths=[2]), [0.75, 0.0])


def test_rollout_two_layers_two_tokens_by_hand():
    # A_l = 0.5 W_l + 0.5 I:
    #   W1 = [[1, 0], [.5, .5]] -> A1 = [[1, 0], [.25, .75]]
    #   W2 = [[.5, .5], [0, 1]] -> A2 = [[.75, .25], [0, 1]]
    #   R = A2 A1 = [[.75 + .0625, .1875], [.25, .75]]
    W1 = w4([[1, 0], [0.5, 0.5]])
    W2 = w4([[0.5, 0.5], [0, 1]])
    R = analysis.attention_rollout([W1, W2])
    np.testing.assert_allclose(R[0], [[0.8125, 0.1875], [0.25, 0.75]])
    np.testing.assert_allclose(R.sum(-1), 1.0)
    steps = analysis.attention_rollout([W1, W2], return_all=True)
    np.testing.assert_allclose(steps[0, 0], [[1, 0], [0.25, 0.75]])
    # Two heads are averaged first: heads [[1,0],[0,1]] and [[0,1],[1,0]] average to 0.5
    # everywhere, so A = [[.75, .25], [.25, .75]] for one layer.
    two = np.array([[[[1, 0], [0, 1]], [[0, 1], [1, 0]]]], dtype=float)
    np.testing.assert_allclose(analysis.attention_rollout([two])[0], [[0.75, 0.25], [0.25, 0.75]])
    # max over heads: 0.5 * 1 + 0.5 * I = [[1, .5], [.5, 1]] -> rows renormalised to 2/3, 1/3.
    np.testing.assert_allclose(
        analysis.attention_rollout([two], head_reduce="max")[0], [[2 / 3, 1 / 3], [1 / 3, 2 / 3]]
    )
    with pytest.raises(ValueError, match="self-attention"):
        analysis.attention_rollout([np.ones((1, 1, 2, 3))])


def test_marked_mass_vs_uniform_baseline():
    # 4 valid keys of 5 (the last is padding), 1 of them marked: baseline 1/4.
    marked = np.array([[False, True, False, False, True]])
    uniform = np.array([[0.25, 0.25, 0.25, 0.25, 0.0]])
    res = analysis.marked_token_mass(uniform, marked, key_lengths=[4])
    assert res.baseline == pytest.approx(0.25)
    np.testing.assert_allclose(res.mass, [0.25])
    np.testing.assert_allclose(res.ratio, [1.0])
    focused = np.array([[0.1, 0.7, 0.1, 0.1, 0.0]])
    res = analysis.marked_token_mass(focused, marked, key_lengths=[4])
    np.testing.assert_allclose(res.mass, [0.7])
    assert res.mean_mass == pytest.approx(0.7)
    np.testing.assert_allclose(res.ratio, [2.8])
    # [B, N, T, S] input averages over valid rows and then examples, per head.
    w = np.zeros((2, 1, 2, 3))
    w[0, 0] = [[1, 0, 0], [0, 1, 0]]
    w[1, 0] = [[0, 0, 1], [0.5, 0.5, 0]]
    m = np.array([[True, False, False], [False, False, True]])
    res = analysis.marked_token_mass(w, m, query_lengths=[2, 1])
    np.testing.assert_allclose(res.per_example_mass[:, 0], [0.5, 1.0])
    np.testing.assert_allclose(res.mass, [0.75])
    assert res.baseline == pytest.approx(1 / 3)


def test_alignment_accuracy_anti_diagonal():
    target = analysis.anti_diagonal_target([4, 3], 5)
    np.testing.assert_array_equal(target, [[3, 2, 1, 0, -1], [2, 1, 0, -1, -1]])
    bos_eos = analysis.anti_diagonal_target([5], 4, key_start=1, key_trailing=1)
    np.testing.assert_array_equal(bos_eos, [[3, 2, 1, -1]])
    B, N, T, S = 2, 2, 5, 4
    w = np.zeros((B, N, T, S))
    for b in range(B):
        for i in range(T):
            if target[b, i] >= 0:
                w[b, 0, i, target[b, i]] = 1.0  # head 0 aligned
            w[b, 1, i, 0] = 1.0  # head 1 always on key 0
    kw = dict(query_lengths=[4, 3], key_lengths=[4, 3])
    np.testing.assert_allclose(
        analysis.alignment_accuracy(w, target, heads="each", **kw), [1, 2 / 7]
    )
    assert analysis.alignment_accuracy(w, target, heads=0, **kw) == 1.0
    # The mean of the two heads ties on key 0 where head 0 is not already there: argmax -> 0.
    assert analysis.alignment_accuracy(w, target, **kw) == pytest.approx(2 / 7)
    # A boolean target accepting a set of keys per query (e.g. a date field).
    accept = np.zeros((B, T, S), bool)
    accept[:, :, 0] = True
    assert analysis.alignment_accuracy(w, accept, heads=1, **kw) == pytest.approx(1.0)


def test_topk_roundtrip_and_order():
    w = np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    v, i = analysis.topk_compress(w, 2)
    np.testing.assert_array_equal(i[0], [1, 3])
    np.testing.assert_allclose(v[0], [0.4, 0.3])
    assert i.dtype == np.int32 and v.dtype == np.float32
    dense = analysis.topk_decompress(v, i, 4)
    np.testing.assert_allclose(dense[0], [0, 0.4, 0, 0.3])
    v_all, i_all = analysis.topk_compress(w, 10)  # clamped to S: lossless
    np.testing.assert_array_equal(analysis.topk_decompress(v_all, i_all, 4), w)
    np.testing.assert_array_equal(i_all[1], [0, 1, 2, 3])  # ties by increasing index
    with pytest.raises(ValueError):
        analysis.topk_compress(w, 0)


def test_layer_head_stats_shapes():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(5), size=(2, 3, 5))
    b = rng.dirichlet(np.ones(5), size=(2, 2, 5))
    stats = analysis.layer_head_stats({"a": a, "b": b}, {"a": ([5, 3], [5, 3])})
    assert set(stats) == {"entropy", "distance", "sink"}
    assert stats["entropy"].shape == (2, 3) and np.isnan(stats["entropy"][1, 2])
    assert np.isfinite(stats["sink"][0]).all()


def test_bad_shapes_are_clear():
    with pytest.raises(ValueError, match=r"\[B, N, T, S\]"):
        analysis.head_entropy(np.ones((2, 2)))
    with pytest.raises(ValueError, match="query_lengths"):
        analysis.head_entropy(np.ones((2, 1, 2, 2)), query_lengths=[1, 2, 3])
