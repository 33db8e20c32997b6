"""Efficient variants against plain references of the same variant, written here.

- linear: `φ(Q) φ(K)ᵀ` formed explicitly, masked, normalised (`φ = elu + 1`);
- FAVOR+: the same estimator with an explicit `[T, S]` matrix and no stabilisers; its error
  against exact softmax falls as the number of features grows (fixed seeds);
- local: exact attention masked with the same window (`dot_product_attention`);
- block-sparse: exact attention masked by the same block pattern expanded to positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn import dot_product_attention, testing
from flaxattn.kernels.efficient import (
    bigbird_block_layout,
    block_sparse_attention,
    elu_feature_map,
    favor_attention,
    favor_projection,
    linear_attention,
    local_attention,
)

B, T, N, K, H = 2, 23, 4, 2, 8
ATOL = dict(atol=2e-5, rtol=2e-5)


def qkv(T=T, S=None, N=N, K=K, H=H, seed=0, sigma=1.0):
    S = T if S is None else S
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        sigma * jax.random.normal(ks[0], (B, T, N, H)),
        sigma * jax.random.normal(ks[1], (B, S, K, H)),
        jax.random.normal(ks[2], (B, S, K, H)),
    )


def visible_np(T, S, *, is_causal=False, q_len=None, kv_len=None, window=None):
    """`[B, 1, T, S]` visibility (top-left alignment), from `flaxattn.testing`."""
    return testing.visibility(B, T, S, is_causal=is_causal, window=window, q_lengths=q_len,
                              kv_lengths=kv_len)[:, None]


def kernel_reference(phi_q, phi_k, v, weight):
    """out = (A ⊙ weight) v / rowsum, A = φ(q)·φ(k); 0 for an empty row. weight [B, N, T, S]."""
    G = phi_q.shape[2] // phi_k.shape[2]
    a = jnp.einsum("btnf,bsnf->bnts", phi_q, jnp.repeat(phi_k, G, axis=2)) * weight
    num = jnp.einsum("bnts,bsnv->btnv", a, jnp.repeat(v, G, axis=2))
    den = jnp.swapaxes(a.sum(-1), 1, 2)[..., None]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


LENGTHS = dict(query_seq_lengths=jnp.array([T, 17]), key_value_seq_lengths=jnp.array([19, T]))
KERNEL_CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "causal, lengths": dict(is_causal=True, **LENGTHS),
    "key mask": dict(mask="key"),
    "dense mask (O(T·S) path)": dict(mask="dense", is_causal=True),
    "key bias": dict(bias="key"),
    "dense bias, window": dict(bias="dense", local_window_size=(4, 2)),
}


def case_arrays(case, T=T, S=T):
    kw = dict(case)
    rng = np.random.default_rng(1)
    weight = np.ones((B, 1, T, S))
    if kw.get("mask") == "key":
        kw["mask"] = jnp.asarray(rng.random((B, 1, 1, S)) < 0.7)
    elif kw.get("mask") == "dense":
        kw["mask"] = jnp.asarray(rng.random((B, 1, T, S)) < 0.7)
    if "mask" in kw:
        weight = weight * np.asarray(kw["mask"])
    if kw.get("bias") == "key":
        kw["bias"] = jnp.asarray(rng.normal(size=(1, N, 1, S)), jnp.float32)
    elif kw.get("bias") == "dense":
        kw["bias"] = jnp.asarray(rng.normal(size=(B, N, T, S)), jnp.float32)
    if "bias" in kw:
        weight = weight * np.exp(np.asarray(kw["bias"]))
    lengths = {
        "q_len": kw.get("query_seq_lengths"),
        "kv_len": kw.get("key_value_seq_lengths"),
    }
    weight = weight * visible_np(
        T, S, is_causal=kw.get("is_causal", False), window=kw.get("local_window_size"), **lengths
    )
    return kw, jnp.asarray(weight, jnp.float32)


# --- linear attention -------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*KERNEL_CASES, "causal, one chunk"])
def test_linear_matches_naive(case):
    q, k, v = qkv()
    chunk_size = 64 if case == "causal, one chunk" else 5
    kw, weight = case_arrays(KERNEL_CASES.get(case, dict(is_causal=True)))
    out = linear_attention(q, k, v, chunk_size=chunk_size, **kw)
    ref = kernel_reference(elu_feature_map(q), elu_feature_map(k), v, weight)
    np.testing.assert_allclose(out, ref, **ATOL)


def test_linear_causal_gradients_match_naive():
    q, k, v = qkv()
    _, weight = case_arrays(dict(is_causal=True))
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    ours = jax.grad(
        loss(lambda q, k, v: linear_attention(q, k, v, is_causal=True, chunk_size=4)),
        argnums=(0, 1, 2),
    )(q, k, v)
    ref = jax.grad(
        loss(lambda q, k, v: kernel_reference(elu_feature_map(q), elu_feature_map(k), v, weight)),
        argnums=(0, 1, 2),
    )(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_linear_unbatched_and_empty_rows():
    q, k, v = qkv()
    out = linear_attention(q[0], k[0], v[0], is_causal=True)
    np.testing.assert_allclose(out, linear_attention(q, k, v, is_causal=True)[0], **ATOL)
    padded = linear_attention(q, k, v, query_seq_lengths=jnp.array([T, 3]))
    assert np.all(np.asarray(padded[1, 3:]) == 0.0)
    nothing = linear_attention(q, k, v, mask=jnp.zeros((1, 1, 1, T), bool))
    assert np.all(np.asarray(nothing) == 0.0)


# --- FAVOR+ -----------------------------------------------------------------------------------


def favor_features_plain(x, w, scale):
    """φ(x) = exp(W x - |x|²/2) with x scaled by √scale; no stabiliser (small inputs)."""
    x = x * scale**0.5
    return jnp.exp(x @ w.T - 0.5 * jnp.sum(x * x, -1, keepdims=True))


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_favor_matches_plain_estimator(case):
    q, k, v = qkv(sigma=0.5)
    w = favor_projection(jax.random.key(3), 64, H)
    kw, weight = case_arrays(KERNEL_CASES[case])
    out = favor_attention(q, k, v, projection=w, chunk_size=8, **kw)
    scale = 1 / H**0.5
    ref = kernel_reference(
        favor_features_plain(q, w, scale), favor_features_plain(k, w, scale), v, weight
    )
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "is_causal, orthogonal",
    [(False, True), (True, True), (True, False)],
    ids=["orthogonal", "causal, orthogonal", "causal, iid"],
)
def test_favor_error_falls_with_features(is_causal, orthogonal):
    q, k, v = qkv(T=64, H=16, sigma=0.5)
    exact = dot_product_attention(q, k, v, is_causal=is_causal)

    def error(m):  # mean over fixed seeds
        return np.mean(
            [
                float(
                    jnp.mean(
                        jnp.abs(
                            favor_attention(
                                q,
                                k,
                                v,
                                is_causal=is_causal,
                                num_features=m,
                                orthogonal=orthogonal,
                                feature_key=jax.random.key(seed),
                            )
                            - exact
                        )
                    )
                )
                for seed in range(4)
            ]
        )

    errors = [error(m) for m in (8, 128, 2048)]
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors  # about 1/√M: 4x per 16x features
    assert errors[2] < 0.02, errors


def test_favor_honours_padding_and_masks():
    """Padded keys (holding huge values) change nothing; the same as truncating the sequence."""
    q, k, v = qkv(sigma=0.5)
    w = favor_projection(jax.random.key(0), 32, H)
    valid = 15
    k_garbage = k.at[:, valid:].set(30.0)
    v_garbage = v.at[:, valid:].set(1e6)
    truncated = favor_attention(q, k[:, :valid], v[:, :valid], projection=w, is_causal=True)
    lengths = jnp.array([valid, valid])
    padded = favor_attention(
        q, k_garbage, v_garbage, projection=w, is_causal=True, key_value_seq_lengths=lengths
    )
    np.testing.assert_allclose(padded, truncated, atol=1e-5, rtol=1e-4)
    key_mask = (jnp.arange(T) < valid)[None, None, None, :]
    masked = favor_attention(q, k_garbage, v_garbage, mask=key_mask, projection=w, is_causal=True)
    np.testing.assert_allclose(masked, truncated, atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("unchecked")
def test_favor_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="favor_attention needs random features: pass feature_key"):
        favor_attention(q, k, v)
    with pytest.raises(ValueError, match=r"projection must have shape \[M, H\] with H=8"):
        favor_attention(q, k, v, projection=jnp.ones((16, 4)))
    with pytest.raises(ValueError, match="local_window_size=30 is larger than the sequence"):
        favor_attention(q, k, v, local_window_size=30, feature_key=jax.random.key(0))


# --- local attention --------------------------------------------------------------------------


LOCAL_CASES = {
    "w=(5, 3)": dict(local_window_size=(5, 3)),
    "w=4, causal, lengths": dict(local_window_size=4, is_causal=True, **LENGTHS),
    "w=(0, 6)": dict(local_window_size=(0, 6)),
    "bottom_right, T<S, lengths": dict(
        local_window_size=(9, 2),
        causal_alignment="bottom_right",
        S=31,
        key_value_seq_lengths=jnp.array([31, 26]),
    ),
    "bottom_right, T<S, causal, no lengths (static band)": dict(
        local_window_size=(9, 2), causal_alignment="bottom_right", is_causal=True, S=31
    ),
    "T>S, w=(3, 12) (static band)": dict(local_window_size=(3, 12), S=17),
    "dense bias and mask, score_mod": dict(
        local_window_size=(3, 3), bias=True, mask=True, score_mod=True
    ),
}


@pytest.mark.parametrize(
    "method, block_size",
    [("band", None), ("blocked", None), pytest.param("band", 7, marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_local_matches_masked_exact(case, method, block_size):
    kw = dict(LOCAL_CASES[case])
    S = kw.pop("S", T)
    q, k, v = qkv(S=S)
    rng = np.random.default_rng(2)
    if kw.pop("bias", False):
        kw["bias"] = jnp.asarray(rng.normal(size=(B, N, T, S)), jnp.float32)
    if kw.pop("mask", False):
        kw["mask"] = jnp.asarray(rng.random((1, N, T, S)) < 0.8)
    if kw.pop("score_mod", False):
        kw["score_mod"] = lambda s, i, j: 10.0 * jnp.tanh(s / 10.0) - 0.1 * (i - j)
    out = local_attention(q, k, v, block_size=block_size, method=method, **kw)
    ref = dot_product_attention(q, k, v, implementation="reference", **kw)
    np.testing.assert_allclose(out, ref, **ATOL)


@pytest.mark.parametrize("method", ["band", "blocked"])
def test_local_gradients_match_masked_exact(method):
    q, k, v = qkv()
    kw = dict(local_window_size=(4, 1), is_causal=True, **LENGTHS)
    local = functools.partial(local_attention, method=method)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, **kw)))
    ours = jax.grad(loss(local), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["band", "blocked"])
def test_local_memory_is_linear_in_T(method):
    """No `[T, S]` array: the compiled scratch grows like T·w, far below one T×T score matrix."""
    shape = (1, 2048, 1, 16)
    x = jnp.zeros(shape)
    fn = jax.jit(
        lambda q, k, v: local_attention(
            q, k, v, local_window_size=(16, 0), is_causal=True, method=method
        )
    )
    temp = fn.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2048 * 2048 * 4 / 8, temp


def test_local_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="implementation='local' needs local_window_size"):
        local_attention(q, k, v)
    with pytest.raises(
        ValueError,
        match=r"local_window_size=\(23, 0\) is larger than the "
        r"sequence \(S=23\)",
    ):
        local_attention(q, k, v, local_window_size=(23, 0))
    for method in ("band", "blocked"):  # the window check comes first for both
        with pytest.raises(ValueError, match="is larger than the sequence"):
            local_attention(q, k, v, local_window_size=(23, 0), method=method)
    with pytest.raises(ValueError, match="method must be 'band' or 'blocked', got 'dense'"):
        local_attention(q, k, v, local_window_size=3, method="dense")
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        local_attention(q, k, v, local_window_size=3, block_size=0)


# --- block-sparse attention -------------------------------------------------------------------


def expand(layout, b, T, S):
    return jnp.asarray(np.kron(layout, np.ones((b, b), bool))[:T, :S])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(is_causal=True),
        dict(is_causal=True, **LENGTHS),
        dict(local_window_size=(6, 6)),
        dict(is_causal=True, num_global_blocks=0, seed=3),
    ],
    ids=["bigbird", "causal", "causal, lengths", "and a window", "causal, no global"],
)
@pytest.mark.parametrize("block_size", [5])
def test_block_sparse_matches_exact_on_pattern(kw, block_size):
    q, k, v = qkv()
    nb = -(-T // block_size)
    pattern = bigbird_block_layout(
        nb,
        nb,
        num_global_blocks=kw.get("num_global_blocks", 1),
        num_random_blocks=1,
        seed=kw.get("seed", 0),
        is_causal=kw.get("is_causal", False),
    )
    out = block_sparse_attention(q, k, v, block_size=block_size, **kw)
    exact_kw = {a: b for a, b in kw.items() if a not in ("num_global_blocks", "seed")}
    ref = dot_product_attention(
        q, k, v, mask=expand(pattern, block_size, T, T), implementation="reference", **exact_kw
    )
    np.testing.assert_allclose(out, ref, **ATOL)


def test_block_sparse_custom_layout_gradients_and_skipping():
    """A custom pattern: exact on it, same gradients; blocks outside it are never read, so NaNs
    in their values cannot reach the output (a masked T×T would give 0·NaN = NaN)."""
    q, k, v = qkv(T=24)
    b = 4
    layout = np.eye(6, dtype=bool) | np.eye(6, k=-2, dtype=bool)  # key block 5 read only by 5
    layout[5, 5] = False
    layout[4, 5] = True
    layout[:, 3] = False  # key block 3 never read
    mask = expand(layout, b, 24, 24)
    fn = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, block_size=b, layout=layout))
    ref_fn = jax.jit(
        lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="reference")
    )
    np.testing.assert_allclose(fn(q, k, v), ref_fn(q, k, v), **ATOL)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for a, r in zip(
        jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v),
        jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)
    v_nan = v.at[:, 12:16].set(jnp.nan)  # key block 3
    assert np.all(np.isfinite(np.asarray(fn(q, k, v_nan))))
    assert not np.all(np.isfinite(np.asarray(ref_fn(q, k, v_nan))))


def test_bigbird_layout():
    lay = bigbird_block_layout(
        8, 8, num_global_blocks=1, window_blocks=1, num_random_blocks=2, seed=0
    )
    assert lay[0].all() and lay[:, 0].all()  # global row and column
    for i in range(8):
        assert lay[i, max(0, i - 1) : i + 2].all()
    for i in range(1, 8):  # global column and window, plus exactly 2 random blocks
        fixed = {0} | set(range(max(0, i - 1), min(8, i + 2)))
        assert lay[i].sum() == len(fixed) + 2, lay.astype(int)
    np.testing.assert_array_equal(lay, bigbird_block_layout(8, 8, num_random_blocks=2, seed=0))
    causal = bigbird_block_layout(8, 8, num_random_blocks=2, is_causal=True)
    assert not np.triu(causal, 1).any()


def test_block_sparse_errors():
    q, k, v = qkv()
    with pytest.raises(
        ValueError,
        match=r"layout must have shape \[ceil\(T/b\), ceil\(S/b\)\] = "
        r"\[3, 3\] for block_size=8, got \(2, 2\)",
    ):
        block_sparse_attention(q, k, v, block_size=8, layout=np.ones((2, 2), bool))
