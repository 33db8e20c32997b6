"""`flaxattn.dot_product_attention` (reference path) against `jax.nn.dot_product_attention` and
against the independent numpy oracle in conftest; plus `attention` / `additive_attention`.

Tolerances (see conftest.TOLERANCES): float32 within 2e-5 of jax.nn and of the float64 oracle;
bfloat16 within 2e-2 (an 8-bit mantissa on outputs of size ~1; jax.nn also rounds the weights
to bf16 before multiplying by the values, flaxattn keeps them in float32); float16 within 3e-3.
Rows where no key is visible are excluded from the jax.nn comparison (jax.nn returns the mean
of the values there, flaxattn returns 0) and tested on their own.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxattn
from flaxattn.kernels import choose_implementation, cosine_score, general_score

DEFAULT = dict(B=2, T=5, S=7, N=4, K=2, H=8)


def _jit(fn, **static):
    """Compile `fn(q, k, v, **arrays, **static)`, passing array keyword arguments as arguments.
    (Eager dispatch of the vmapped kernels costs several times one compilation.)"""
    arrays = {n: x for n, x in static.items() if isinstance(x, jax.Array)}
    rest = {n: x for n, x in static.items() if n not in arrays}
    compiled = jax.jit(lambda q, k, v, arrays: fn(q, k, v, **arrays, **rest))
    return lambda q, k, v: compiled(q, k, v, arrays)


def _shape(spec: str, d: dict) -> tuple[int, ...]:
    """'BNTS'-style spec -> shape; '1' keeps a broadcast axis."""
    return tuple(1 if c == "1" else d[c] for c in spec)


def build(rng, spec: dict, dtype=jnp.float32, oracle=None):
    """Arrays and keyword arguments of one case; `spec` overrides DEFAULT sizes and gives
    `bias` / `mask` as shape specs, lengths as lists, anything else verbatim."""
    d = {**DEFAULT, **{n: x for n, x in spec.items() if n in DEFAULT}}
    q, k, v = oracle.qkv(rng, d["B"], d["T"], d["S"], d["N"], d["K"], d["H"], dtype=dtype)
    kw = {}
    for name, value in spec.items():
        if name in DEFAULT:
            continue
        if name == "bias":
            kw["bias"] = jnp.asarray(rng.standard_normal(_shape(value, d)), jnp.float32)
        elif name == "mask":
            kw["mask"] = jnp.asarray(rng.random(_shape(value, d)) < 0.7)
        elif name.endswith("_lengths"):
            kw[name] = jnp.asarray(value, jnp.int32)
        else:
            kw[name] = value
    return d, q, k, v, kw


def _maybe_np(x):
    return None if x is None else np.asarray(x)


def dense_visible(d: dict, kw: dict, oracle) -> np.ndarray:
    """`[B, N, T, S]` visibility of a case, from the oracle's element-wise rules."""
    visible = oracle.visibility(
        d["B"], d["T"], d["S"],
        is_causal=kw.get("is_causal", False),
        window=kw.get("local_window_size"),
        q_lengths=_maybe_np(kw.get("query_seq_lengths")),
        kv_lengths=_maybe_np(kw.get("key_value_seq_lengths")),
        alignment=kw.get("causal_alignment", "top_left"),
    )
    if kw.get("mask") is not None:
        m = np.asarray(kw["mask"])
        visible = visible & m.reshape((1,) * (4 - m.ndim) + m.shape)
    return np.broadcast_to(visible, (d["B"], d["N"], d["T"], d["S"]))


def oracle_for(q, k, v, d, kw, oracle):
    """The numpy oracle on the case's (dtype-rounded) inputs: (out, weights, lse, visible)."""
    visible = dense_visible(d, kw, oracle)
    bias = kw.get("bias")
    if bias is not None:
        bias = np.asarray(bias).reshape((1,) * (4 - bias.ndim) + bias.shape)
    out, w, lse = oracle.attention(q, k, v, bias=bias, mask=visible, scale=kw.get("scale"))
    return out, w, lse, visible


# Cases shared with jax.nn. Sizes default to B=2, T=5, S=7, N=4, K=2 (GQA), H=8.
CASES = {
    "mha_square": dict(T=6, S=6, N=2, K=2),
    "gqa_t_ne_s": {},
    "mqa": dict(K=1),
    "t1": dict(T=1),
    "s1": dict(S=1),
    "t1_s1": dict(T=1, S=1, N=2, K=1),
    "t_gt_s": dict(T=9, S=4),
    "bias_BNTS": dict(bias="BNTS"),
    "bias_1NTS": dict(bias="1NTS"),
    "bias_B1TS": dict(bias="B1TS"),
    "bias_111S": dict(bias="111S"),
    "bias_TS": dict(bias="TS"),
    "mask_BNTS": dict(mask="BNTS"),
    "mask_B11S": dict(mask="B11S"),
    "mask_1NTS": dict(mask="1NTS"),
    "mask_TS": dict(mask="TS"),
    "mask_11T1": dict(mask="11T1"),
    "scale": dict(scale=0.3),
    "causal": dict(is_causal=True),
    "causal_t_gt_s": dict(is_causal=True, T=7, S=4),
    "q_lengths": dict(query_seq_lengths=[3, 5]),
    "kv_lengths": dict(key_value_seq_lengths=[4, 7]),
    "both_lengths_one_empty": dict(query_seq_lengths=[5, 2], key_value_seq_lengths=[3, 0]),
    "window_int": dict(local_window_size=1),
    "window_left": dict(local_window_size=(2, 0)),
    "window_right": dict(local_window_size=(0, 2)),
    "window_zero": dict(local_window_size=(0, 0)),
    "window_t_gt_s": dict(local_window_size=(1, 1), T=9, S=4),
    "causal_window_lengths": dict(
        is_causal=True, local_window_size=(2, 0), key_value_seq_lengths=[6, 3]
    ),
    "everything": dict(
        bias="B1TS", mask="1NTS", is_causal=True, local_window_size=(3, 1), scale=0.5,
        query_seq_lengths=[4, 5], key_value_seq_lengths=[7, 5],
    ),
    "mqa_causal_mask": dict(K=1, N=3, is_causal=True, mask="B1TS"),
}
LOW_PRECISION_CASES = ["gqa_t_ne_s", "bias_1NTS", "mask_B11S", "causal", "everything"]


def _compare_with_jax_nn(rng, name, dtype, oracle, implementation="reference"):
    d, q, k, v, kw = build(rng, CASES[name], dtype, oracle)
    ours = _jit(flaxattn.dot_product_attention, implementation=implementation,
                return_residual=True, **kw)(q, k, v)
    if dtype == jnp.float16:  # jax.nn's F16_F16_F32 dot is not supported on CPU: upcast it.
        theirs = _jit(jax.nn.dot_product_attention, return_residual=True, **kw)(
            *(x.astype(jnp.float32) for x in (q, k, v))
        )
    else:
        theirs = _jit(jax.nn.dot_product_attention, return_residual=True, **kw)(q, k, v)
    visible = dense_visible(d, kw, oracle)
    rows = np.moveaxis(visible.any(-1), 1, 2)  # [B, T, N]
    tol = oracle.tol[jnp.dtype(dtype).name]
    (out, res), (ref_out, ref_res) = ours, theirs
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == dtype
    assert res.shape == q.shape[:3] and res.dtype == dtype
    f64 = lambda x: np.asarray(x, np.float64)
    np.testing.assert_allclose(f64(out)[rows], f64(ref_out)[rows], **tol)
    np.testing.assert_allclose(f64(res)[rows], f64(ref_res)[rows], **tol)
    # Rows with nothing visible: output 0 and residual -inf (jax.nn differs there by design).
    assert np.all(f64(out)[~rows] == 0.0)
    assert np.all(np.isneginf(f64(res)[~rows]))
    # And the oracle, on the same (rounded) inputs, everywhere.
    ref_out, _, _, _ = oracle_for(q, k, v, d, kw, oracle)
    np.testing.assert_allclose(f64(out), ref_out, **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_jax_nn_float32(rng, oracle, name):
    _compare_with_jax_nn(rng, name, jnp.float32, oracle)


@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_jax_nn_bfloat16(rng, oracle, name):
    _compare_with_jax_nn(rng, name, jnp.bfloat16, oracle)


@pytest.mark.parametrize("name", ["causal", "everything"])
def test_matches_jax_nn_float16(rng, oracle, name):
    _compare_with_jax_nn(rng, name, jnp.float16, oracle)


@pytest.mark.parametrize("name", ["gqa_t_ne_s", "everything", "window_t_gt_s"])
def test_default_implementation_matches_jax_nn(rng, oracle, name):
    _compare_with_jax_nn(rng, name, jnp.float32, oracle, implementation=None)


def test_default_implementation_rule():
    assert choose_implementation(kv_length=7, needs_weights=False, dropout=False) == "reference"
    assert choose_implementation(kv_length=4096, needs_weights=True, dropout=False) == "reference"
    assert choose_implementation(kv_length=4096, needs_weights=False, dropout=True) == "reference"
    assert choose_implementation(kv_length=4096, needs_weights=False, dropout=False) == "blocked"


@pytest.mark.parametrize("name", ["everything", "mask_11T1"])
def test_xla_implementation_is_jax_nn(rng, oracle, name):
    d, q, k, v, kw = build(rng, CASES[name], jnp.float32, oracle)
    ours = _jit(flaxattn.dot_product_attention, implementation="xla", **kw)(q, k, v)
    theirs = _jit(jax.nn.dot_product_attention, implementation="xla", **kw)(q, k, v)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)  # empty rows included


def test_default_returns_just_the_output(rng, oracle):
    _, q, k, v, _ = build(rng, {}, jnp.float32, oracle)
    out = _jit(flaxattn.dot_product_attention)(q, k, v)
    assert isinstance(out, jax.Array) and out.shape == (2, 5, 4, 8)
    out2, _ = _jit(flaxattn.dot_product_attention, return_residual=True)(q, k, v)
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize(
    "bias_spec,mask_spec", [("NTS", "TS"), ("1NTS", "11TS"), ("TS", "1NTS")],
    ids=["rank3_bias", "rank4_bias", "rank2_bias"],
)
def test_unbatched_inputs_match_jax_nn(rng, oracle, bias_spec, mask_spec):
    d = dict(DEFAULT, B=1)
    q, k, v = (x[0] for x in oracle.qkv(rng, 1, d["T"], d["S"], d["N"], d["K"], d["H"]))
    bias = jnp.asarray(rng.standard_normal(_shape(bias_spec, d)), jnp.float32)
    mask = jnp.asarray(rng.random(_shape(mask_spec, d)) < 0.7).at[..., 0].set(True)
    kw = dict(bias=bias, mask=mask, is_causal=True, key_value_seq_lengths=jnp.array([6]))
    out, res = _jit(flaxattn.dot_product_attention, return_residual=True, **kw)(q, k, v)
    ref, ref_res = _jit(jax.nn.dot_product_attention, return_residual=True, **kw)(q, k, v)
    assert out.shape == (5, 4, 8) and res.shape == (5, 4)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(res, ref_res, atol=2e-5, rtol=2e-5)
    # Unbatched weights are [N, T, S].
    _, w = _jit(flaxattn.dot_product_attention, return_weights=True, **kw)(q, k, v)
    assert w.shape == (4, 5, 7)


# --- Rows with nothing visible ------------------------------------------------------------

EMPTY_ROW_CASES = {
    "mask_rows": dict(mask="11T1"),
    "q_lengths": dict(query_seq_lengths=[2, 5]),
    "kv_length_zero": dict(key_value_seq_lengths=[0, 4]),
    "bottom_right_t_gt_s": dict(is_causal=True, causal_alignment="bottom_right", T=7, S=4),
    "window_t_gt_s": dict(local_window_size=(0, 0), T=7, S=4),
}


@pytest.mark.parametrize("name", list(EMPTY_ROW_CASES))
def test_empty_rows_give_zero_and_finite_gradients(rng, oracle, name):
    d, q, k, v, kw = build(rng, dict(EMPTY_ROW_CASES[name], bias="1NTS"), jnp.float32, oracle)
    visible = dense_visible(d, kw, oracle)
    rows = visible.any(-1)  # [B, N, T]
    assert not rows.all() and rows.any(), "the case must have empty and non-empty rows"
    bias = kw.pop("bias")
    f = lambda q, k, v, bias: flaxattn.dot_product_attention(
        q, k, v, bias, implementation="reference", return_residual=True, return_weights=True,
        **kw,
    )
    out, res, w = jax.jit(f)(q, k, v, bias)
    out_rows = np.moveaxis(rows, 1, 2)  # [B, T, N]
    assert np.all(np.asarray(out)[~out_rows] == 0.0)
    assert np.all(np.asarray(w)[~rows] == 0.0)
    assert np.all(np.isneginf(np.asarray(res)[~out_rows]))
    np.testing.assert_allclose(np.asarray(w).sum(-1), rows.astype(np.float32), atol=1e-5)
    ref_out, ref_w, _, _ = oracle_for(q, k, v, d, dict(kw, bias=bias), oracle)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(w, ref_w, atol=2e-5, rtol=2e-5)

    def loss(q, k, v, bias):
        return jnp.sum(jnp.sin(f(q, k, v, bias)[0]))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    assert np.all(np.asarray(grads[0])[~out_rows] == 0.0)  # empty query rows: no gradient


# --- Semantics jax.nn lacks, against the oracle ---------------------------------------------

ORACLE_CASES = {
    "bottom_right_causal_t_lt_s": dict(T=3, S=7, is_causal=True, causal_alignment="bottom_right"),
    "bottom_right_causal_t_gt_s": dict(T=7, S=4, is_causal=True, causal_alignment="bottom_right"),
    "bottom_right_window": dict(
        T=3, S=8, local_window_size=(2, 0), causal_alignment="bottom_right"
    ),
    "bottom_right_window_causal": dict(
        T=4, S=9, is_causal=True, local_window_size=(3, 2), causal_alignment="bottom_right"
    ),
    "window_causal_top_left": dict(T=6, S=6, is_causal=True, local_window_size=(2, 1)),
    "decode_lengths_bottom_right": dict(
        T=4, S=9, is_causal=True, causal_alignment="bottom_right",
        query_seq_lengths=[2, 4], key_value_seq_lengths=[5, 9],
    ),
    "decode_lengths_window": dict(
        T=3, S=8, is_causal=True, local_window_size=(2, 0), causal_alignment="bottom_right",
        query_seq_lengths=[1, 3], key_value_seq_lengths=[6, 4], bias="B1TS", mask="1N1S",
    ),
    "bottom_right_square_is_top_left": dict(T=6, S=6, is_causal=True,
                                            causal_alignment="bottom_right"),
}


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_matches_numpy_oracle(rng, oracle, name):
    d, q, k, v, kw = build(rng, ORACLE_CASES[name], jnp.float32, oracle)
    out, res, w = _jit(
        flaxattn.dot_product_attention, implementation="reference", return_residual=True,
        return_weights=True, **kw,
    )(q, k, v)
    ref_out, ref_w, ref_lse, visible = oracle_for(q, k, v, d, kw, oracle)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(w, ref_w, atol=2e-5, rtol=2e-5)
    lse = np.moveaxis(ref_lse, 1, 2)
    finite = np.isfinite(lse)
    np.testing.assert_allclose(np.asarray(res)[finite], lse[finite], atol=2e-5, rtol=2e-5)
    assert np.all(np.isneginf(np.asarray(res)[~finite]))
    if name == "bottom_right_square_is_top_left":
        top_left = dict(kw, causal_alignment="top_left")
        ref = _jit(jax.nn.dot_product_attention, **{n: x for n, x in top_left.items()
                                                    if n != "causal_alignment"})(q, k, v)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_bottom_right_is_decoding_with_a_cache(rng, oracle):
    """A chunk of the last queries over the whole cache (bottom-right causal) gives the last
    rows of full causal self-attention; with padded buffers, query i of a chunk of q_len sits
    at kv_len - q_len + i."""
    L, chunk = 9, 3
    _, q, k, v, _ = build(rng, dict(T=L, S=L), jnp.float32, oracle)
    full = _jit(flaxattn.dot_product_attention, is_causal=True)(q, k, v)
    part = _jit(flaxattn.dot_product_attention, is_causal=True,
                causal_alignment="bottom_right")(q[:, L - chunk:], k, v)
    np.testing.assert_allclose(part, full[:, L - chunk:], atol=2e-5, rtol=2e-5)
    # Padded: example b has kv_len[b] cached tokens and q_len[b] new ones in fixed buffers.
    kv_len, q_len = np.array([7, 4]), np.array([2, 3])
    T_buf, S_buf = 4, 9
    qb = np.zeros((2, T_buf) + q.shape[2:], np.float32)
    kb = np.zeros((2, S_buf) + k.shape[2:], np.float32)
    vb = np.zeros((2, S_buf) + v.shape[2:], np.float32)
    for b in range(2):
        qb[b, : q_len[b]] = q[b, kv_len[b] - q_len[b]: kv_len[b]]
        kb[b, : kv_len[b]] = k[b, : kv_len[b]]
        vb[b, : kv_len[b]] = v[b, : kv_len[b]]
    qb, kb, vb = jnp.asarray(qb), jnp.asarray(kb), jnp.asarray(vb)
    out = _jit(flaxattn.dot_product_attention, is_causal=True, causal_alignment="bottom_right",
               query_seq_lengths=jnp.asarray(q_len), key_value_seq_lengths=jnp.asarray(kv_len),
               )(qb, kb, vb)
    for b in range(2):
        np.testing.assert_allclose(
            out[b, : q_len[b]], full[b, kv_len[b] - q_len[b]: kv_len[b]], atol=2e-5, rtol=2e-5
        )
        np.testing.assert_array_equal(out[b, q_len[b]:], 0.0)


def test_gqa_equals_mha_with_repeated_kv(rng, oracle):
    _, q, k, v, kw = build(rng, dict(N=6, K=2, mask="B1TS", is_causal=True), jnp.float32, oracle)
    gqa = _jit(flaxattn.dot_product_attention, **kw)(q, k, v)
    mha = _jit(flaxattn.dot_product_attention, **kw)(q, jnp.repeat(k, 3, 2), jnp.repeat(v, 3, 2))
    np.testing.assert_allclose(gqa, mha, atol=1e-6, rtol=1e-6)


def test_value_head_dim_may_differ(rng, oracle):
    q, k, v = oracle.qkv(rng, 2, 5, 7, 4, 2, 8, Hv=3)
    out = _jit(flaxattn.dot_product_attention, is_causal=True)(q, k, v)
    assert out.shape == (2, 5, 4, 3)
    ref, _, _ = oracle.attention(q, k, v, mask=oracle.visibility(2, 5, 7, is_causal=True))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


# --- Weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["everything", "mqa_causal_mask", "both_lengths_one_empty"])
def test_return_weights(rng, oracle, name):
    d, q, k, v, kw = build(rng, CASES[name], jnp.float32, oracle)
    out, w = _jit(flaxattn.dot_product_attention, return_weights=True, **kw)(q, k, v)
    B, N, T, S = d["B"], d["N"], d["T"], d["S"]
    assert w.shape == (B, N, T, S) and w.dtype == jnp.float32
    rows = dense_visible(d, kw, oracle).any(-1)
    np.testing.assert_allclose(np.asarray(w).sum(-1), rows.astype(np.float32), atol=1e-5)
    assert np.all(np.asarray(w) >= 0.0)
    # The output is the weights applied to the (group-shared) values.
    v_rep = np.repeat(np.asarray(v), N // d["K"], axis=2)
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", w, v_rep), atol=2e-5, rtol=2e-5)
    _, ref_w, _, _ = oracle_for(q, k, v, d, kw, oracle)
    np.testing.assert_allclose(w, ref_w, atol=2e-5, rtol=2e-5)


def test_dropout_through_the_public_api(rng, oracle):
    _, q, k, v, kw = build(rng, dict(is_causal=True), jnp.float32, oracle)
    run = jax.jit(lambda key: flaxattn.dot_product_attention(
        q, k, v, dropout_rate=0.4, dropout_key=key, return_weights=True, **kw))
    (o1, w1), (o2, w2), (_, w3) = run(jax.random.key(1)), run(jax.random.key(1)), run(
        jax.random.key(2)
    )
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(w1, w3)
    # Heads and examples draw different masks.
    dropped = np.asarray(w1) == 0
    assert not np.array_equal(dropped[0, 0], dropped[0, 1])
    assert not np.array_equal(dropped[0, 0], dropped[1, 0])
    # Rate 0 with a key is the plain attention; the output is the dropped weights @ v.
    o0 = _jit(flaxattn.dot_product_attention, dropout_rate=0.0, dropout_key=jax.random.key(1),
              **kw)(q, k, v)
    np.testing.assert_array_equal(o0, _jit(flaxattn.dot_product_attention, **kw)(q, k, v))
    v_rep = np.repeat(np.asarray(v), 2, axis=2)
    np.testing.assert_allclose(o1, np.einsum("bnts,bsnh->btnh", w1, v_rep), atol=2e-5, rtol=2e-5)


# --- attention(score_fn=...) and additive_attention -----------------------------------------


def test_attention_general_score_per_head(rng, oracle):
    B, T, S, N, K, D = 2, 4, 6, 4, 2, 3
    q, k, v = oracle.qkv(rng, B, T, S, N, K, D, Hv=5)
    W = jnp.asarray(rng.standard_normal((N, D, D)), jnp.float32)
    mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.7)
    lengths = jnp.array([6, 3], jnp.int32)
    out, w = jax.jit(
        lambda q, k, v, W, mask: flaxattn.scored_attention(
            q, k, v, mask=mask, score_fn=general_score, score_params=(W,), is_causal=True,
            key_value_seq_lengths=lengths, return_weights=True,
        )
    )(q, k, v, W, mask)
    Wn = np.asarray(W, np.float64)
    visible = oracle.visibility(B, T, S, is_causal=True, kv_lengths=np.asarray(lengths))
    visible = visible & np.asarray(mask)
    ref, ref_w, _ = oracle.attention(
        q, k, v, mask=visible, logits_fn=lambda qh, kh, n: qh @ Wn[n] @ kh.T
    )
    assert out.shape == (B, T, N, 5) and w.shape == (B, N, T, S)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(w, ref_w, atol=1e-5, rtol=1e-4)


def test_attention_cosine_score_with_per_head_temperature(rng, oracle):
    B, T, S, N, K, D = 1, 5, 5, 2, 1, 4
    q, k, v = oracle.qkv(rng, B, T, S, N, K, D)
    temps = jnp.array([0.5, 0.1])
    out = jax.jit(
        lambda q, k, v: flaxattn.scored_attention(
            q, k, v, score_fn=cosine_score, score_params=(temps,), local_window_size=(1, 1)
        )
    )(q, k, v)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    ref, _, _ = oracle.attention(
        q, k, v, mask=oracle.visibility(B, T, S, window=(1, 1)),
        logits_fn=lambda qh, kh, n: unit(qh) @ unit(kh).T / float(temps[n]),
    )
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    # Default score_fn: the scaled dot product, same as dot_product_attention.
    np.testing.assert_allclose(
        _jit(flaxattn.scored_attention, is_causal=True)(q, k, v),
        _jit(flaxattn.dot_product_attention, is_causal=True)(q, k, v),
        atol=1e-6, rtol=1e-6,
    )


def test_additive_attention_per_head(rng, oracle):
    B, T, S, N, K, D, E, A = 2, 3, 5, 4, 2, 3, 2, 6
    q = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, E)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, 4)), jnp.float32)
    wq = jnp.asarray(rng.standard_normal((N, D, A)), jnp.float32)
    wk = jnp.asarray(rng.standard_normal((N, E, A)), jnp.float32)
    we = jnp.asarray(rng.standard_normal((N, A)), jnp.float32)
    q_len = jnp.array([3, 2], jnp.int32)
    out, w = jax.jit(
        lambda *a: flaxattn.additive_attention(
            *a, query_seq_lengths=q_len, return_weights=True
        )
    )(q, k, v, wq, wk, we)
    Wq, Wk, We = (np.asarray(x, np.float64) for x in (wq, wk, we))

    def logits(qh, kh, n):
        return np.tanh((qh @ Wq[n])[:, None, :] + (kh @ Wk[n])[None, :, :]) @ We[n]

    ref, ref_w, _ = oracle.attention(
        q, k, v, mask=oracle.visibility(B, T, S, q_lengths=np.asarray(q_len)), logits_fn=logits
    )
    assert out.shape == (B, T, N, 4)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(w, ref_w, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(out[1, 2], 0.0)  # past the query length


# --- jit, vmap, grad and dtypes -------------------------------------------------------------


def test_vmap_over_an_extra_leading_axis(rng, oracle):
    _, q, k, v, kw = build(rng, dict(B=1, T=3, S=4, N=2, K=1, H=4, is_causal=True), jnp.float32,
                           oracle)
    f = partial(flaxattn.dot_product_attention, local_window_size=(1, 0), **kw)
    E = 3
    qs, ks, vs = (jnp.stack([x * (e + 1) for e in range(E)]) for x in (q, k, v))
    masks = jnp.asarray(rng.random((E, 1, 1, 3, 4)) < 0.6)
    lengths = jnp.array([[4], [2], [3]], jnp.int32)
    g = lambda q, k, v, m, n: f(q, k, v, mask=m, key_value_seq_lengths=n)
    batched = jax.jit(jax.vmap(g))(qs, ks, vs, masks, lengths)
    one = jax.jit(g)
    for e in range(E):
        np.testing.assert_allclose(
            batched[e], one(qs[e], ks[e], vs[e], masks[e], lengths[e]), atol=1e-6, rtol=1e-6
        )


def test_check_grads_reference(rng, oracle):
    d, q, k, v, kw = build(
        rng, dict(B=1, T=4, S=5, N=2, K=1, H=3, is_causal=True, key_value_seq_lengths=[4],
                  bias="1NTS"), jnp.float32, oracle,
    )
    bias = kw.pop("bias")
    f = jax.jit(lambda q, k, v, b: flaxattn.dot_product_attention(
        q, k, v, b, implementation="reference", **kw))
    check_grads(f, (q, k, v, bias), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["everything", "mqa_causal_mask", "both_lengths_one_empty"])
def test_gradients_match_jax_nn(rng, oracle, name):
    d, q, k, v, kw = build(rng, CASES[name], jnp.float32, oracle)
    rows = np.moveaxis(dense_visible(d, kw, oracle).any(-1), 1, 2)[..., None]  # [B, T, N, 1]
    cot = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],)) * rows, jnp.float32)
    bias = kw.pop("bias", jnp.zeros((1, 1, 1, d["S"]), jnp.float32))

    def grads(fn):
        loss = lambda q, k, v, b: jnp.sum(fn(q, k, v, b, **kw) * cot)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    ours = grads(partial(flaxattn.dot_product_attention, implementation="reference"))
    theirs = grads(jax.nn.dot_product_attention)
    for name_, a, b in zip("qkvb", ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name_)


def test_bfloat16_is_close_to_float32(rng, oracle):
    d, q, k, v, kw = build(rng, CASES["everything"], jnp.float32, oracle)
    f = _jit(flaxattn.dot_product_attention, **kw)
    out32 = f(q, k, v)
    out16 = f(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    # Rounding q, k and v to bf16 (relative 2^-9) moves logits of size ~3 by ~0.02: 5e-2.
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=5e-2, rtol=5e-2)
