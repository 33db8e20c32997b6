"""Hypothesis property tests over random shapes, masks, biases, lengths, causal and window
options: the reference and blocked implementations against the float64 reference, and
invariances.

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
from flaxattn import testing

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
    options = {"implementation": "reference", **dict(options)}
    return jax.jit(
        lambda q, k, v, arrays: flaxattn.dot_product_attention(q, k, v, **arrays, **options)
    )


def _run(q, k, v, kw, **extra):
    """The reference kernel under jit: arrays traced, options static."""
    arrays = {n: jnp.asarray(x) for n, x in kw.items() if n not in _STATIC}
    options = {n: x for n, x in kw.items() if n in _STATIC} | extra
    return _compiled(tuple(sorted(options.items())))(q, k, v, arrays)


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
@PROPERTY_SETTINGS
@given(case=cases())
def test_implementations_match_the_float64_reference(implementation, case):
    """On random shapes, masks, biases, lengths, causal and windows: the float64 reference
    of `flaxattn.testing`; with the weights (reference), rows sum to 1 or, where nothing is
    visible, to 0 exactly, with output 0."""
    d, kw, seed = case
    q, k, v = _qkv(d, seed)
    extra = dict(return_residual=True, implementation=implementation)
    if implementation == "blocked":
        extra["block_sizes"] = (2, 2)
    else:
        extra["return_weights"] = True
    results = _run(q, k, v, kw, **extra)
    out, res = results[0], np.asarray(results[1])
    ref = testing.reference(q, k, v, return_weights=True, **kw)
    np.testing.assert_allclose(out, ref.out, atol=2e-5, rtol=2e-5)
    ref_lse = np.moveaxis(ref.lse, 1, 2)
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(res[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    assert np.all(np.isneginf(res[~finite]))
    rows = np.moveaxis(finite, 1, 2)  # [B, N, T]: the rows that see a key
    assert np.all(np.asarray(out)[~np.moveaxis(rows, 1, 2)] == 0.0)
    if implementation == "reference":
        w = np.asarray(results[2])
        np.testing.assert_allclose(w, ref.weights, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(w.sum(-1), rows.astype(np.float32), atol=1e-5)
        assert np.all(w[~rows] == 0.0) and np.all(w >= 0.0)


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
