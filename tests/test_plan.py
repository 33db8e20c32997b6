"""The block plan against a dense evaluation of the masks it summarises.

No visible pair may ever sit in a skipped block, and no block marked full may hide a pair; the
lists must hold exactly the non-empty blocks, ascending, from both sides.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxattn.kernels._plan import EMPTY, FULL, PARTIAL, plan_blocks
from flaxattn.kernels._visibility import Limits, Visibility


def _dense(vis: Visibility, q_len, kv_len, T, S) -> np.ndarray:
    """`[B, T, S]` visibility written out element by element."""
    out = np.zeros((len(q_len), T, S), bool)
    for b, (ql, kl) in enumerate(zip(q_len, kv_len, strict=True)):
        offset = kl - ql if vis.causal_alignment == "bottom_right" else 0
        for i in range(min(ql, T)):
            p = i + offset
            for j in range(min(kl, S)):
                ok = not (vis.is_causal and j > p)
                if vis.window is not None:
                    ok &= p - vis.window[0] <= j <= p + vis.window[1]
                out[b, i, j] = ok
    return out


def _expected_states(dense: np.ndarray, bq: int, bk: int) -> np.ndarray:
    B, T, S = dense.shape
    nq, nk = -(-T // bq), -(-S // bk)
    padded = np.zeros((B, nq * bq, nk * bk), bool)
    padded[:, :T, :S] = dense
    tiles = padded.reshape(B, nq, bq, nk, bk)
    return np.where(tiles.all((2, 4)), FULL, np.where(tiles.any((2, 4)), PARTIAL, EMPTY))


def _check(vis, q_len, kv_len, T, S, bq, bk, masked=False):
    limits = Limits(jnp.array(q_len), jnp.array(kv_len),
                    jnp.array(kv_len) - jnp.array(q_len) if vis.causal_alignment == "bottom_right"
                    else jnp.zeros(len(q_len), jnp.int32))  # fmt: skip
    nq, nk = -(-T // bq), -(-S // bk)
    plan = plan_blocks(vis, limits, nq * bq, nk * bk, bq, bk, masked=masked)
    want = _expected_states(_dense(vis, q_len, kv_len, T, S), bq, bk)
    if masked:
        want = np.minimum(want, PARTIAL)
    for b in range(len(q_len)):
        for i in range(nq):
            count = int(plan.kv_count[b, i])
            listed = np.asarray(plan.kv_index[b, i, :count])
            np.testing.assert_array_equal(listed, np.flatnonzero(want[b, i] != EMPTY))
            np.testing.assert_array_equal(
                np.asarray(plan.kv_full[b, i, :count]), want[b, i, listed] == FULL
            )
            assert not np.asarray(plan.kv_full[b, i, count:]).any()
        for j in range(nk):
            count = int(plan.q_count[b, j])
            listed = np.asarray(plan.q_index[b, j, :count])
            np.testing.assert_array_equal(listed, np.flatnonzero(want[b, :, j] != EMPTY))
            np.testing.assert_array_equal(
                np.asarray(plan.q_full[b, j, :count]), want[b, listed, j] == FULL
            )


@pytest.mark.parametrize("vis", [
    Visibility(),
    Visibility(is_causal=True),
    Visibility(is_causal=True, causal_alignment="bottom_right"),
    Visibility(window=(5, 2)),
    Visibility(is_causal=True, window=(9, 0), causal_alignment="bottom_right"),
], ids=["full", "causal", "causal bottom-right", "window", "causal window bottom-right"])
def test_plan_equals_dense_classification(vis):
    q_len, kv_len = [40, 17, 40, 5, 40], [48, 48, 30, 0, 3]
    _check(vis, q_len, kv_len, 40, 48, 8, 16)
    _check(vis, q_len, kv_len, 40, 48, 8, 16, masked=True)


RANDOM_STRUCTURES = dict(
    data=st.data(),
    causal=st.booleans(),
    bottom_right=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))),
    bq=st.sampled_from([1, 3, 8]),
    bk=st.sampled_from([1, 4, 8]),
)


def _check_random_structure(data, causal, bottom_right, window, bq, bk):
    T, S = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 24))
    q_len = data.draw(st.lists(st.integers(0, T), min_size=2, max_size=2))
    kv_len = data.draw(st.lists(st.integers(0, S), min_size=2, max_size=2))
    vis = Visibility(is_causal=causal, window=window,
                     causal_alignment="bottom_right" if bottom_right else "top_left")
    _check(vis, q_len, kv_len, T, S, bq, bk)


# A few random structures in the default run (the first examples pay for compilation);
# many more in the slow run.
test_plan_on_random_structures = settings(max_examples=4, deadline=None)(
    given(**RANDOM_STRUCTURES)(_check_random_structure)
)
test_plan_on_many_random_structures = pytest.mark.slow(
    settings(max_examples=150, deadline=None)(given(**RANDOM_STRUCTURES)(_check_random_structure))
)


def test_a_plan_without_lengths_is_shared_and_lists_past_the_count_repeat_the_last():
    vis = Visibility(is_causal=True)
    plan = plan_blocks(vis, vis.limits(3, 32, 32), 32, 32, 8, 8, shared=True)
    assert plan.kv_count.shape == (1, 4)
    np.testing.assert_array_equal(plan.kv_count[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(plan.kv_index[0, 1], [0, 1, 1, 1])  # a prefetch stays put
    np.testing.assert_array_equal(plan.kv_full[0, 1], [True, False, False, False])
    np.testing.assert_allclose(plan.visited_fraction(), [10 / 16])
