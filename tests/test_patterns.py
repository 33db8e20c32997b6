"""flaxattn.analysis pattern scores on hand-made weights whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from flaxattn import analysis


def one_hot_rows(keys: list[int], S: int | None = None) -> np.ndarray:
    """`[T, S]` weights: row i all on key keys[i]."""
    S = len(keys) if S is None else S
    w = np.zeros((len(keys), S))
    w[np.arange(len(keys)), keys] = 1.0
    return w


def causal_uniform(T: int) -> np.ndarray:
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def test_previous_token_head_scores_one_and_uniform_scores_the_mean_of_one_over_i():
    T = 6
    prev = one_hot_rows([0] + list(range(T - 1)))  # row 0 has no previous token: left out
    w = np.stack([prev, causal_uniform(T)])[None]  # [1, 2, T, T]
    score = analysis.previous_token_score(w)
    expected_uniform = np.mean([1 / (i + 1) for i in range(1, T)])
    np.testing.assert_allclose(score, [1.0, expected_uniform])


def test_induction_target_marks_the_token_after_each_earlier_occurrence():
    tokens = np.array([[5, 7, 9, 5, 7]])
    target = analysis.induction_target(tokens)[0]
    assert target.shape == (5, 5)
    # query 3 (token 5) -> key 1 (after the 5 at 0); query 4 (token 7) -> key 2 (after 7 at 1)
    assert set(zip(*np.nonzero(target), strict=True)) == {(3, 1), (4, 2)}


def test_induction_head_scores_one_and_previous_token_head_zero_on_a_repeat():
    tokens = np.array([[1, 2, 3, 4, 1, 2, 3, 4]])
    T = tokens.shape[1]
    # induction head: from position i of the repeat to i - 4 + 1; elsewhere on itself
    induction = one_hot_rows([i - 3 if i >= 4 else i for i in range(T)])
    prev = one_hot_rows([max(i - 1, 0) for i in range(T)])
    w = np.stack([induction, prev])[None]
    np.testing.assert_allclose(analysis.induction_score(w, tokens), [1.0, 0.0])
    np.testing.assert_allclose(analysis.previous_token_score(w), [0.0, 1.0])


def test_induction_score_splits_credit_between_several_earlier_occurrences():
    tokens = np.array([[3, 8, 3, 9, 3]])
    # query 4 (token 3) may go to key 1 or key 3 (after each earlier 3); half on each = 1.0
    w = np.tile(np.eye(5), (1, 1, 1, 1)).astype(float)
    w[0, 0, 4] = [0, 0.5, 0, 0.5, 0]
    w[0, 0, 2] = [0, 0.25, 0.75, 0, 0]  # query 2 (token 3): target key 1 only
    np.testing.assert_allclose(analysis.induction_score(w, tokens), [(1.0 + 0.25) / 2])


def test_diagonal_anti_diagonal_and_sink_scores():
    T = 4
    eye, flip, first = np.eye(T), np.eye(T)[::-1], one_hot_rows([0] * T)
    w = np.stack([eye, flip, first])[None]  # [1, 3, T, T]
    np.testing.assert_allclose(analysis.diagonal_score(w), [1.0, 0.0, 0.25])
    np.testing.assert_allclose(analysis.anti_diagonal_score(w), [0.0, 1.0, 0.25])
    scores = analysis.pattern_scores({"layer": w})
    np.testing.assert_allclose(scores["sink"][0], [0.25, 0.25, 1.0])
    assert np.isnan(scores["induction"]).all()  # no tokens given


def test_anti_diagonal_follows_each_examples_key_length():
    # example with 3 valid keys out of 4: the mirror of query i is key 2 - i
    w = one_hot_rows([2, 1, 0, 0], S=4)[None, None]
    score = analysis.anti_diagonal_score(w, query_lengths=[3], key_lengths=[3])
    np.testing.assert_allclose(score, [1.0])


def test_positional_score_is_one_for_a_fixed_pattern_and_a_hand_value_otherwise():
    fixed = np.tile(causal_uniform(3), (4, 1, 1, 1))  # same weights for 4 examples
    np.testing.assert_allclose(analysis.positional_score(fixed), [1.0])
    # row 0 fixed; row 1 [0, 1] in one example, [1, 0] in the other:
    # per-cell variance mean 0.125, total variance 0.25 -> 1 - 0.5
    w = np.array([[[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 0.0], [1.0, 0.0]]]])
    np.testing.assert_allclose(analysis.positional_score(w), [0.5])
    with pytest.raises(ValueError, match="at least 2 examples"):
        analysis.positional_score(w[:1])


def test_pattern_scores_table_has_a_row_per_layer_and_nan_for_missing_heads():
    tokens = np.array([[1, 2, 1, 2], [3, 4, 3, 4]])
    prev = np.tile(one_hot_rows([0, 0, 1, 2]), (2, 1, 1, 1))  # [2, 1, 4, 4]
    induction = np.tile(one_hot_rows([0, 1, 1, 2]), (2, 2, 1, 1))  # [2, 2, 4, 4]
    scores = analysis.pattern_scores({"l0": prev, "l1": induction}, tokens)
    assert set(scores) == set(analysis.PATTERN_SCORES)
    assert all(v.shape == (2, 2) for v in scores.values())
    np.testing.assert_allclose(scores["previous_token"][0, 0], 1.0)
    assert np.isnan(scores["previous_token"][0, 1])  # layer 0 has one head
    np.testing.assert_allclose(scores["induction"][1], [1.0, 1.0])
    np.testing.assert_allclose(scores["positional"][0, 0], 1.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: analysis.previous_token_score(np.ones((2, 3, 3))), r"\[B, N, T, S\]"),
        (lambda: analysis.induction_score(np.ones((1, 1, 3, 3)), np.ones((1, 4))), "tokens"),
        (lambda: analysis.induction_target(np.ones(3)), r"tokens must have shape \[B, T\]"),
        (lambda: analysis.pattern_scores({}), "at least one layer"),
    ],
    ids=["weights rank 3", "tokens length", "tokens rank 1", "no layers"],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
