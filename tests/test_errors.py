"""Every bad input gives a ValueError / TypeError that names the argument (with the expected and
actual shapes where there are shapes), at trace time: eagerly, and when traced under jax.jit
with the array arguments abstract."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxattn
from flaxattn.kernels import _single_head, additive_score, soft_cap_score_mod

# These tests check flaxattn's own messages, which users get: the annotation checks are off.
pytestmark = pytest.mark.usefixtures("unchecked")

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8
dpa = flaxattn.dot_product_attention


@pytest.fixture(scope="module")
def qkv():
    r = np.random.default_rng(0)
    shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, H)]
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes)


def ones(*shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


def case(fn, exc, match, jit=True, **arrays):
    """`fn(q, k, v, **arrays)` must raise `exc` matching `match`; `arrays` are traced under jit."""
    return pytest.param(fn, arrays, exc, match, jit)


BNTS = r"\[B, N, T, S\] = \[2, 4, 5, 7\]"

CASES = {
    # Ranks and shapes of query / key / value.
    "query_rank_2": case(
        lambda q, k, v: dpa(q[0, :, 0], k[0, :, 0], v[0, :, 0]), ValueError,
        r"query must have rank 4 .*got shape \(5, 8\)",
    ),
    "rank_5": case(
        lambda q, k, v: dpa(q[None], k[None], v[None]), ValueError,
        r"query must have rank 4 .*got shape \(1, 2, 5, 4, 8\)",
    ),
    "mixed_ranks": case(
        lambda q, k, v: dpa(q[0], k, v), ValueError,
        r"query, key and value must all have rank 4 .*\(5, 4, 8\), \(2, 7, 2, 8\)",
    ),
    "head_dim_mismatch": case(
        lambda q, k, v: dpa(q, k[..., :6], v), ValueError,
        r"key head_dim must equal query head_dim \(8\), got key shape \(2, 7, 2, 6\)",
    ),
    "head_dim_zero": case(
        lambda q, k, v: dpa(q[..., :0], k[..., :0], v[..., :0]), ValueError,
        r"head_dim must be at least 1",
    ),
    "heads_not_divisible": case(
        lambda q, k, v: dpa(q, jnp.concatenate([k, k[:, :, :1]], 2),
                            jnp.concatenate([v, v[:, :, :1]], 2)),
        ValueError, r"key heads \(3\) must divide query heads \(4\)",
    ),
    "key_value_length_mismatch": case(
        lambda q, k, v: dpa(q, k, v[:, :6]), ValueError,
        r"value must have key's \[batch, length, heads\] = \(2, 7, 2\), got value shape "
        r"\(2, 6, 2, 8\)",
    ),
    "key_value_heads_mismatch": case(
        lambda q, k, v: dpa(q, k, v[:, :, :1]), ValueError, r"value must have key's",
    ),
    "batch_mismatch": case(
        lambda q, k, v: dpa(q, k[:1], v[:1]), ValueError,
        r"key batch size must equal query's \(2\), got key shape \(1, 7, 2, 8\)",
    ),
    "value_batch_mismatch": case(
        lambda q, k, v: dpa(q, k, v[:1]), ValueError, r"value must have key's",
    ),
    "dtype_mismatch": case(
        lambda q, k, v: dpa(q, k.astype(jnp.bfloat16), v), TypeError,
        r"query, key and value must have one dtype, got float32, bfloat16 and float32",
    ),
    "integer_inputs": case(
        lambda q, k, v: dpa(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)),
        TypeError, r"query must be a floating array, got dtype int32",
    ),
    "not_an_array": case(
        lambda q, k, v: dpa(np.asarray(q).tolist(), k, v), TypeError,
        r"query must be an array, got list", jit=False,
    ),
    # Masks and biases.
    "mask_not_boolean": case(
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), TypeError,
        r"mask must be boolean .*Got dtype float32", mask=ones(B, 1, T, S),
    ),
    "mask_int": case(
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), TypeError, r"mask must be boolean",
        mask=ones(B, 1, T, S, dtype=jnp.int32),
    ),
    "mask_wrong_length": case(
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), ValueError,
        rf"mask must be broadcastable to {BNTS} .*got shape \(2, 4, 5, 8\)",
        mask=ones(B, N, T, S + 1, dtype=bool),
    ),
    "mask_kv_heads_axis": case(
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), ValueError,
        rf"mask must be broadcastable to {BNTS} .*got shape \(1, 2, 5, 7\)",
        mask=ones(1, K, T, S, dtype=bool),
    ),
    "mask_rank_5": case(
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), ValueError,
        r"mask must be broadcastable .*got shape \(1, 2, 4, 5, 7\)",
        mask=ones(1, B, N, T, S, dtype=bool),
    ),
    "mask_query_axis_last": case(  # a [T] mask lines up with S, not T: no silent broadcast
        lambda q, k, v, mask: dpa(q, k, v, mask=mask), ValueError,
        r"mask must be broadcastable .*got shape \(5,\)", mask=ones(T, dtype=bool),
    ),
    "bias_transposed": case(
        lambda q, k, v, bias: dpa(q, k, v, bias), ValueError,
        rf"bias must be broadcastable to {BNTS} .*got shape \(2, 4, 7, 5\)",
        bias=ones(B, N, S, T),
    ),
    "bias_batch_3": case(
        lambda q, k, v, bias: dpa(q, k, v, bias), ValueError,
        r"bias must be broadcastable .*got shape \(3, 1, 1, 7\)", bias=ones(3, 1, 1, S),
    ),
    "bias_boolean": case(
        lambda q, k, v, bias: dpa(q, k, v, bias), TypeError,
        r"bias must be a floating array, got dtype bool", bias=ones(1, 1, T, S, dtype=bool),
    ),
    # Lengths.
    "q_lengths_wrong_shape": case(
        lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n), ValueError,
        r"query_seq_lengths must have shape \[B\] = \[2\], got shape \(3,\)",
        n=jnp.array([1, 2, 3], jnp.int32),
    ),
    "kv_lengths_column": case(
        lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n), ValueError,
        r"key_value_seq_lengths must have shape \[B\] = \[2\], got shape \(2, 1\)",
        n=jnp.array([[1], [2]], jnp.int32),
    ),
    "kv_lengths_scalar": case(
        lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n), ValueError,
        r"key_value_seq_lengths must have shape \[B\] = \[2\], got shape \(\)",
        n=jnp.array(3, jnp.int32),
    ),
    "lengths_float": case(
        lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n), TypeError,
        r"query_seq_lengths must be an integer array, got dtype float32",
        n=jnp.array([1.0, 2.0]),
    ),
    "lengths_bool": case(
        lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n), TypeError,
        r"key_value_seq_lengths must be an integer array, got dtype bool",
        n=jnp.array([True, False]),
    ),
    # Options.
    "window_negative": case(
        lambda q, k, v: dpa(q, k, v, local_window_size=-1), ValueError,
        r"local_window_size must be a non-negative int or a \(left, right\) pair of them, "
        r"got -1",
    ),
    "window_triple": case(
        lambda q, k, v: dpa(q, k, v, local_window_size=(1, 2, 3)), ValueError,
        r"local_window_size .*got \(1, 2, 3\)",
    ),
    "window_float": case(
        lambda q, k, v: dpa(q, k, v, local_window_size=1.5), ValueError,
        r"local_window_size .*got 1.5",
    ),
    "window_negative_right": case(
        lambda q, k, v: dpa(q, k, v, local_window_size=(2, -1)), ValueError,
        r"local_window_size .*got \(2, -1\)",
    ),
    "unknown_implementation": case(
        lambda q, k, v: dpa(q, k, v, implementation="flash"), ValueError,
        r"implementation must be one of \['reference', 'blocked', 'pallas', 'xla', 'cudnn', "
        r"'linear', 'favor', 'block_sparse', 'local', 'ring'\], got 'flash'",
    ),
    "bad_causal_alignment": case(
        lambda q, k, v: dpa(q, k, v, is_causal=True, causal_alignment="center"), ValueError,
        r"causal_alignment must be one of \['top_left', 'bottom_right'\], got 'center'",
    ),
    "bad_scale": case(
        lambda q, k, v: dpa(q, k, v, scale="big"), TypeError, r"scale must be a number",
    ),
    # Dropout.
    "dropout_without_key": case(
        lambda q, k, v: dpa(q, k, v, dropout_rate=0.1), ValueError,
        r"dropout_rate=0.1 needs an explicit PRNG key in dropout_key",
    ),
    "dropout_rate_one": case(
        lambda q, k, v, key: dpa(q, k, v, dropout_rate=1.0, dropout_key=key), ValueError,
        r"dropout_rate must be in \[0, 1\), got 1.0", key=jax.random.key(0),
    ),
    "dropout_rate_negative": case(
        lambda q, k, v, key: dpa(q, k, v, dropout_rate=-0.1, dropout_key=key), ValueError,
        r"dropout_rate must be in \[0, 1\), got -0.1", key=jax.random.key(0),
    ),
    "dropout_rate_nan": case(
        lambda q, k, v, key: dpa(q, k, v, dropout_rate=float("nan"), dropout_key=key),
        ValueError, r"dropout_rate must be in \[0, 1\)", key=jax.random.key(0),
    ),
    "dropout_key_not_a_key": case(
        lambda q, k, v, key: dpa(q, k, v, dropout_rate=0.1, dropout_key=key), TypeError,
        r"dropout_key must be one PRNG key", key=jnp.array([1.0, 2.0]),
    ),
    "dropout_key_batch_of_keys": case(
        lambda q, k, v, key: dpa(q, k, v, dropout_rate=0.1, dropout_key=key), TypeError,
        r"dropout_key must be one PRNG key.*shape \(3,\)",
        key=jax.random.split(jax.random.key(0), 3),
    ),
    "dropout_key_int": case(
        lambda q, k, v: dpa(q, k, v, dropout_rate=0.1, dropout_key=3), TypeError,
        r"dropout_key must be one PRNG key",
    ),
    # Implementations that cannot do what is asked.
    "weights_with_blocked": case(
        lambda q, k, v: dpa(q, k, v, implementation="blocked", return_weights=True), ValueError,
        r"implementation='blocked' does not support return_weights; implementations that do: "
        r"reference\.",
    ),
    "dropout_with_blocked": case(
        lambda q, k, v, key: dpa(q, k, v, implementation="blocked", dropout_rate=0.1,
                                 dropout_key=key),
        ValueError, r"implementation='blocked' does not support dropout_rate; implementations "
        r"that do: reference\.", key=jax.random.key(0),
    ),
    "xla_with_score_mod": case(
        lambda q, k, v: dpa(q, k, v, implementation="xla", score_mod=soft_cap_score_mod(5.0)),
        ValueError, r"implementation='xla' does not support score_mod",
    ),
    "xla_with_mask_mod": case(
        lambda q, k, v: dpa(q, k, v, implementation="xla",
                            mask_mod=lambda i, j: j <= i),
        ValueError, r"implementation='xla' does not support mask_mod",
    ),
    "xla_with_weights": case(
        lambda q, k, v: dpa(q, k, v, implementation="xla", return_weights=True), ValueError,
        r"implementation='xla' does not support return_weights",
    ),
    "xla_with_dropout": case(
        lambda q, k, v, key: dpa(q, k, v, implementation="xla", dropout_rate=0.2,
                                 dropout_key=key),
        ValueError, r"implementation='xla' does not support dropout_rate", key=jax.random.key(0),
    ),
    "xla_bottom_right": case(
        lambda q, k, v: dpa(q, k, v, implementation="xla", causal_alignment="bottom_right"),
        ValueError, r"implementation='xla' does not support causal_alignment='bottom_right'",
    ),
    # Unbatched inputs are checked the same way.
    "unbatched_bias_not_broadcastable": case(
        lambda q, k, v, bias: dpa(q[0], k[0], v[0], bias), ValueError,
        r"bias must be broadcastable to \[B, N, T, S\] = \[1, 4, 5, 7\] .*got shape "
        r"\(2, 4, 5, 7\)",
        bias=ones(B, N, T, S),
    ),
    "unbatched_lengths_shape": case(
        lambda q, k, v, n: dpa(q[0], k[0], v[0], key_value_seq_lengths=n), ValueError,
        r"key_value_seq_lengths must have shape \[B\] = \[1\], got shape \(2,\)",
        n=jnp.array([3, 4], jnp.int32),
    ),
    # attention() and additive_attention().
    "score_params_wrong_heads": case(
        lambda q, k, v, w: flaxattn.scored_attention(
            q, k, v, score_fn=flaxattn.kernels.general_score, score_params=(w,)),
        ValueError,
        r"score_params\[0\] must have a leading heads axis of size N=4, got shape \(2, 8, 8\)",
        w=ones(K, H, H),
    ),
    "additive_weights_wrong_heads": case(
        lambda q, k, v, wq, wk, we: flaxattn.additive_attention(q, k, v, wq, wk, we),
        ValueError, r"score_params\[2\] must have a leading heads axis of size N=4",
        wq=ones(N, H, 3), wk=ones(N, H, 3), we=ones(3),
    ),
    "attention_head_dims_default_score": case(
        lambda q, k, v: flaxattn.scored_attention(q, k[..., :3], v), ValueError,
        r"key head_dim must equal query head_dim \(8\)",
    ),
    "attention_bad_mask": case(
        lambda q, k, v, mask: flaxattn.scored_attention(
            q, k, v, mask=mask, score_fn=functools.partial(additive_score)), TypeError,
        r"mask must be boolean", mask=ones(T, S),
    ),
    "attention_dropout_without_key": case(
        lambda q, k, v: flaxattn.scored_attention(q, k, v, dropout_rate=0.5), ValueError,
        r"needs an explicit PRNG key in dropout_key",
    ),
}


@pytest.mark.parametrize("fn,arrays,exc,match,jit", list(CASES.values()), ids=list(CASES))
def test_bad_input_raises_eagerly_and_at_trace_time(qkv, fn, arrays, exc, match, jit):
    with pytest.raises(exc, match=match):
        fn(*qkv, **arrays)
    if jit:
        # Raised while tracing, with every array argument abstract: nothing is compiled or run.
        with pytest.raises(exc, match=match):
            jax.jit(fn).trace(*qkv, **arrays)


def test_traced_static_options_are_clear_errors(qkv):
    with pytest.raises(TypeError, match=r"is_causal must be a static Python bool"):
        jax.jit(lambda q, k, v, c: dpa(q, k, v, is_causal=c)).trace(*qkv, True)
    with pytest.raises(TypeError, match=r"dropout_rate must be a static Python float"):
        jax.jit(
            lambda q, k, v, r: dpa(q, k, v, dropout_rate=r, dropout_key=jax.random.key(0))
        ).trace(*qkv, 0.5)


def test_single_head_dropout_is_checked(qkv):
    q, k, v = (x[0, :, 0] for x in qkv)
    with pytest.raises(ValueError, match=r"needs an explicit PRNG key in dropout_key"):
        flaxattn.kernels.single_head_attention(q, k, v, dropout_rate=0.5)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        _single_head.attention_parts(q, k, v, dropout_rate=1.5, dropout_key=jax.random.key(0))


def test_valid_edge_inputs_are_accepted(qkv):
    """Things that look odd but are valid do not raise: zero-length keys or queries, a traced
    scale (as jax.nn allows), a concrete array scale, lengths of any integer dtype."""
    q, k, v = qkv
    out = dpa(q, k[:, :0], v[:, :0])
    assert out.shape == q.shape and not np.any(np.asarray(out))
    assert dpa(q[:, :0], k, v).shape == (B, 0, N, H)
    traced = jax.jit(lambda q, k, v, s: dpa(q, k, v, scale=s))(q, k, v, 0.5)
    np.testing.assert_allclose(traced, dpa(q, k, v, scale=jnp.float32(0.5)), atol=1e-6)
    lengths = jnp.array([3, 7], jnp.int8)
    np.testing.assert_allclose(
        dpa(q, k, v, key_value_seq_lengths=lengths),
        dpa(q, k, v, key_value_seq_lengths=lengths.astype(jnp.int32)), atol=1e-6,
    )
