"""Hypothesis property tests of the reference implementation over random shapes, masks,
lengths, causal and window options.

Shapes come from a small fixed set (each new shape or option set compiles once), with
`max_examples=25` per property, so the whole module stays a few seconds of compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flaxattn

pytestmark = pytest.mark.usefixtures("strict_rank_promotion")

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# (B, T, S, N, K, H): T != S, T = 1, S = 1, GQA, MQA, MHA, odd sizes.
SHAPES = [
    (1, 3, 5, 2, 1, 4),
    (2, 4, 4, 4, 2, 2),
    (2, 5, 3, 2, 2, 3),
    (1, 1, 6, 3, 1, 2),
    (2, 4, 1, 2, 1, 2),
]
MASK_SPECS = [None, "B1TS", "BNTS", "11TS", "B11S", "1N1S"]
WINDOWS = [None, 0, (1, 0), (2, 1), (0, 2)]


def _shape(spec, d):
    return tuple(1 if c == "1" else d[c] for c in spec)


@st.composite
def cases(draw, *, structured=True):
    """A random call: shapes, a boolean mask, an optional bias, lengths, and (when
    `structured`) causal / window / alignment."""
    B, T, S, N, K, H = draw(st.sampled_from(SHAPES))
    d = dict(B=B, T=T, S=S, N=N, K=K, H=H)
    kw = {}
    spec = draw(st.sampled_from(MASK_SPECS))
    if spec is not None:
        kw["mask"] = draw(hnp.arrays(np.bool_, _shape(spec, d)))
    if draw(st.booleans()):
        kw["bias"] = draw(
            hnp.arrays(np.float32, _shape("1NTS", d),
                       elements=st.floats(-3, 3, width=32, allow_nan=False))
        )
    if draw(st.booleans()):
        kw["query_seq_lengths"] = np.array(draw(st.lists(st.integers(0, T), min_size=B,
                                                         max_size=B)), np.int32)
    if structured:
        if draw(st.booleans()):
            kw["key_value_seq_lengths"] = np.array(
                draw(st.lists(st.integers(0, S), min_size=B, max_size=B)), np.int32
            )
        kw["is_causal"] = draw(st.booleans())
        kw["local_window_size"] = draw(st.sampled_from(WINDOWS))
        kw["causal_alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    seed = draw(st.integers(0, 2**16))
    return d, kw, seed


def _qkv(d, seed):
    r = np.random.default_rng(seed)
    shapes = [(d["B"], d["T"], d["N"], d["H"]), (d["B"], d["S"], d["K"], d["H"]),
              (d["B"], d["S"], d["K"], d["H"])]
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes)


_STATIC = ("is_causal", "local_window_size", "causal_alignment")


@functools.cache
def _compiled(options: tuple) -> Callable:
    """One jitted function per set of static options, so repeated shapes hit jit's cache."""
    return jax.jit(
        lambda q, k, v, arrays: flaxattn.dot_product_attention(
            q, k, v, implementation="reference", **arrays, **dict(options)
        )
    )


def _run(q, k, v, kw, **extra):
    """The reference kernel under jit: arrays traced, options static."""
    arrays = {n: jnp.asarray(x) for n, x in kw.items() if n not in _STATIC}
    options = {n: x for n, x in kw.items() if n in _STATIC} | extra
    return _compiled(tuple(sorted(options.items())))(q, k, v, arrays)


def _oracle_inputs(d, kw, oracle):
    visible = oracle.visibility(
        d["B"], d["T"], d["S"],
        is_causal=kw.get("is_causal", False),
        window=kw.get("local_window_size"),
        q_lengths=kw.get("query_seq_lengths"),
        kv_lengths=kw.get("key_value_seq_lengths"),
        alignment=kw.get("causal_alignment", "top_left"),
    )
    if "mask" in kw:
        visible = visible & kw["mask"]
    return np.broadcast_to(visible, (d["B"], d["N"], d["T"], d["S"])), kw.get("bias")


@PROPERTY_SETTINGS
@given(case=cases())
def test_reference_matches_numpy_oracle(oracle, case):
    d, kw, seed = case
    q, k, v = _qkv(d, seed)
    out, res, w = _run(q, k, v, kw, return_residual=True, return_weights=True)
    visible, bias = _oracle_inputs(d, kw, oracle)
    ref_out, ref_w, ref_lse = oracle.attention(q, k, v, bias=bias, mask=visible)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(w, ref_w, atol=2e-5, rtol=2e-5)
    res, ref_lse = np.asarray(res), np.moveaxis(ref_lse, 1, 2)
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(res[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    assert np.all(np.isneginf(res[~finite]))
    # Rows sum to 1, or to 0 exactly where nothing is visible (and their output is 0).
    rows = visible.any(-1)
    np.testing.assert_allclose(np.asarray(w).sum(-1), rows.astype(np.float32), atol=1e-5)
    assert np.all(np.asarray(w)[~rows] == 0.0) and np.all(np.asarray(w) >= 0.0)
    assert np.all(np.asarray(w)[~visible] == 0.0)
    assert np.all(np.asarray(out)[~np.moveaxis(rows, 1, 2)] == 0.0)


@PROPERTY_SETTINGS
@given(case=cases(structured=False), perm_seed=st.integers(0, 2**16))
def test_output_invariant_to_permuting_keys_with_values(case, perm_seed):
    """Without causal, window or key lengths, which key sits where does not matter: permuting
    keys, values and the key axis of mask and bias together leaves the output unchanged."""
    d, kw, seed = case
    q, k, v = _qkv(d, seed)
    perm = np.random.default_rng(perm_seed).permutation(d["S"])
    permuted = dict(kw)
    for name in ("mask", "bias"):
        if name in kw and kw[name].shape[-1] == d["S"]:
            permuted[name] = kw[name][..., perm]
    out = _run(q, k, v, kw)
    out_perm = _run(q, k[:, perm], v[:, perm], permuted)
    np.testing.assert_allclose(out_perm, out, atol=1e-5, rtol=1e-5)
