"""The conformance suite: every registered implementation × every case × dtype.

For each pair the registry decides: an implementation that supports what the case needs (and
runs here) must equal the float64 reference of `flaxattn.testing`, output, logsumexp and the
gradients of q, k, v and bias, under `jit`; one that does not must raise the registry's
`ValueError` naming the feature ("does not support ...", "needs ...", "runs on ...") — never
be skipped. Where jax.nn has the case's features (no modifiers, top-left alignment, no row
without a visible key, where jax.nn averages), the result must also equal
`jax.nn.dot_product_attention`. Pattern implementations are compared with the reference
restricted to their pattern; approximations are checked for shape, dtype, finiteness and
empty rows (their accuracy is tested in test_efficient.py).

The default run covers every case in float32 and one in bfloat16 and in float16; `-m slow` runs
the whole dtype matrix.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxattn
from flaxattn.kernels import get_implementation, implementations
from flaxattn.kernels._call import prepare
from flaxattn.kernels.efficient import bigbird_block_layout
from flaxattn.testing import CASES, GRAD_TOLERANCES, TOLERANCES, Case, reference

# Interpret mode spends its time in XLA's CPU compiler; the kernels' code is what is tested.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The default run's 16-bit cases, one per dtype (every other case runs in 16 bits under -m slow).
SIXTEEN_BIT_CASES = {"bfloat16": "T=19, S=19, causal, gqa=2",
                     "float16": "T=17, S=23, bias [1, N, T, S], Hv=5"}  # fmt: skip
DTYPES = ("float32", "bfloat16", "float16")
BLOCK_SPARSE = dict(block_size=8, num_global_blocks=1, window_blocks=1, num_random_blocks=1)


def _params():
    for name in implementations():
        for case in CASES:
            for dtype in DTYPES:
                marks = []
                if dtype != "float32" and case.id != SIXTEEN_BIT_CASES[dtype]:
                    marks.append(pytest.mark.slow)
                yield pytest.param(name, case, dtype, id=f"{name} | {case.id} | {dtype}",
                                   marks=marks)  # fmt: skip


def _call_fn(name: str, case: Case):
    """`f(query, key, value, bias, mask, dropout_key) -> out` (the residual where there is
    one) for implementation `name`, through its public entry point."""
    kw = case.keywords()
    if case.dropout:
        kw.update(dropout_rate=case.dropout)
    impl = get_implementation(name)
    blocks = {"block_sizes": case.blocks} if case.blocks and name in ("blocked", "pallas") else {}

    def fn(q, k, v, bias, mask, dropout_key):
        extra = {"dropout_key": dropout_key} if case.dropout else {}
        if name == "ring":
            mesh = jax.make_mesh((1,), ("seq",), devices=jax.devices()[:1])
            return flaxattn.ring_attention(q, k, v, bias, mask, mesh=mesh, axis_name="seq",
                                           return_residual=True, **kw, **extra)  # fmt: skip
        if name == "local":
            return flaxattn.local_attention(q, k, v, bias, mask, **kw, **extra)
        if name == "block_sparse":
            return flaxattn.block_sparse_attention(q, k, v, bias, mask, **BLOCK_SPARSE, **kw,
                                                   **extra)  # fmt: skip
        if name == "linear":
            return flaxattn.linear_attention(q, k, v, bias, mask, **kw, **extra)
        if name == "favor":
            return flaxattn.favor_attention(q, k, v, bias, mask, feature_key=jax.random.key(1),
                                            **kw, **extra)  # fmt: skip
        residual = "residual" in impl.supports
        return flaxattn.dot_product_attention(q, k, v, bias, mask, implementation=name,
                                              return_residual=residual, **blocks, **kw,
                                              **extra)  # fmt: skip

    return fn


def _expected_error(name: str, case: Case, arrays) -> str | None:
    """The registry's message this implementation must raise for the case, or None."""
    impl = get_implementation(name)
    why = impl.unavailable()
    if why is not None:
        return f"implementation={name!r} runs on"
    kw = case.keywords()
    if case.dropout:
        kw.update(dropout_rate=case.dropout, dropout_key=jax.random.key(0))
    call = prepare(arrays["query"], arrays["key"], arrays["value"], arrays["bias"],
                   arrays["mask"], **kw)  # fmt: skip
    if impl.unsupported(call) is not None:
        return f"implementation={name!r} does not support {impl.unsupported(call)}"
    if impl.lacks(call) is not None:
        return f"implementation={name!r} needs {impl.lacks(call)}"
    window = call.visibility.window
    if name in ("ring", "local", "linear", "favor", "block_sparse") and window is not None and (
        max(window) >= call.dims.S
    ):
        return "is larger than the sequence"
    return None


@pytest.mark.parametrize(("name", "case", "dtype"), list(_params()))
def test_conformance(name, case, dtype):
    arrays = case.inputs(dtype)
    as_dtype = lambda x: None if x is None else jnp.asarray(x, dtype)
    q, k, v, d_out = (as_dtype(arrays[n]) for n in ("query", "key", "value", "d_out"))
    bias = as_dtype(arrays["bias"])
    mask = None if arrays["mask"] is None else jnp.asarray(arrays["mask"])
    fn = _call_fn(name, case)
    error = _expected_error(name, case, {**arrays, "query": q, "key": k, "value": v,
                                         "bias": bias, "mask": mask})  # fmt: skip
    dropout_key = jax.random.key(2)
    if error is not None:
        with pytest.raises(ValueError, match=re.escape(error)):
            fn(q, k, v, bias, mask, dropout_key)
        return
    impl = get_implementation(name)
    kind = impl.kind

    empty = None  # [B, T, N]: rows with no visible key, where jax.nn's delegates average
    if not impl.zero_empty_rows:
        from flaxattn.testing import visibility

        vis = visibility(case.B, case.T, case.S, is_causal=case.causal, window=case.window,
                         q_lengths=case.q_len, kv_lengths=case.kv_len)[:, :, None, :]
        if mask is not None:
            vis = vis & np.swapaxes(np.asarray(mask), 1, 2)
        empty = ~np.broadcast_to(vis, (case.B, case.T, case.N, case.S)).any(-1)
        d_out = jnp.where(empty[..., None], 0, d_out)

    # A cotangent on the logsumexp too (ring attention merges partial results by it).
    d_lse = jnp.asarray(np.random.default_rng(5).standard_normal((case.B, case.T, case.N)),
                        jnp.float32)  # fmt: skip
    if empty is not None:
        d_lse = jnp.where(empty, 0, d_lse)
    if not impl.residual_grad:  # the registry says its logsumexp is a constant to autodiff
        d_lse = jnp.zeros_like(d_lse)

    def outputs_and_grads(q, k, v, bias):
        results, vjp = jax.vjp(lambda *a: fn(*a, mask, dropout_key), q, k, v, bias)
        if not isinstance(results, tuple):
            return results, vjp(d_out)
        lse = results[1]
        return results, vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0).astype(lse.dtype)))

    compiled = jax.jit(outputs_and_grads).lower(q, k, v, bias).compile(
        FAST_COMPILE if name == "pallas" else None
    )
    results, grads = compiled(q, k, v, bias)
    out = results[0] if isinstance(results, tuple) else results
    assert out.shape == (case.B, case.T, case.N, case.Hv or case.H) and out.dtype == q.dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert all(g is None or bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)
    if kind == "approximate":
        return
    if case.dropout:
        _check_dropout(case, arrays, q, k, v)
        return
    visible = None
    if kind == "pattern":
        layout = bigbird_block_layout(-(-case.T // 8), -(-case.S // 8), is_causal=case.causal,
                                      num_global_blocks=1, window_blocks=1,
                                      num_random_blocks=1)  # fmt: skip
        if case.causal and case.alignment == "top_left":
            layout &= np.tril(np.ones_like(layout))
        visible = lambda rows: layout[rows // 8][:, np.arange(case.S) // 8]
    has_lse = isinstance(results, tuple)
    lse_cot = None
    if has_lse:  # the cotangent the implementation got, in its dtype
        lse_cot = np.where(np.isfinite(np.asarray(results[1], np.float32)),
                           np.asarray(d_lse.astype(results[1].dtype), np.float32), 0)  # fmt: skip
        lse_cot = np.swapaxes(lse_cot, 1, 2)  # [B, N, T]
    ref = reference(arrays["query"], arrays["key"], arrays["value"], arrays["bias"],
                    arrays["mask"], d_out=np.asarray(d_out, np.float32), d_lse=lse_cot,
                    visible=visible, **case.keywords())  # fmt: skip
    if empty is not None:  # compare the rows that see a key
        out = jnp.where(empty[..., None], 0, out)
        results = (out, jnp.where(empty, -jnp.inf, results[1]))  # lse [B, T, N]
    tol, grad_tol = TOLERANCES[dtype], GRAD_TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref.out, **tol, err_msg="output")
    if isinstance(results, tuple):
        lse = np.swapaxes(np.asarray(results[1], np.float32), 1, 2)
        finite = np.isfinite(ref.lse)
        np.testing.assert_array_equal(np.isfinite(lse) | ~finite, True)
        np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, ref.lse, 0),
                                   **grad_tol, err_msg="logsumexp")  # fmt: skip
    for label, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref.grads, strict=True):
        if want is not None:
            np.testing.assert_allclose(np.asarray(got, np.float32), want, **grad_tol,
                                       err_msg=label)  # fmt: skip
    if _jax_nn_has(case) and kind == "exact":
        want = jax.nn.dot_product_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
            None if bias is None else bias.astype(jnp.float32), mask, is_causal=case.causal,
            local_window_size=case.window,
            query_seq_lengths=None if case.q_len is None else jnp.asarray(case.q_len),
            key_value_seq_lengths=None if case.kv_len is None else jnp.asarray(case.kv_len),
        )
        np.testing.assert_allclose(np.asarray(out, np.float32), want, **tol, err_msg="jax.nn")


def _jax_nn_has(case: Case) -> bool:
    """jax.nn has the case's features and agrees on it (no row without a visible key)."""
    if case.score_mod or case.mask_mod or case.alignment != "top_left" or case.mask:
        return False
    if case.Hv not in (None, case.H):
        return False
    from flaxattn.testing import visibility

    vis = visibility(case.B, case.T, case.S, is_causal=case.causal, window=case.window,
                     q_lengths=None, kv_lengths=case.kv_len)  # fmt: skip
    return case.q_len is None and bool(vis.any(-1).all())


def _check_dropout(case: Case, arrays, q, k, v) -> None:
    """With dropout, each returned weight is 0 or the undropped weight / (1 - rate), about a
    `rate` share are 0, and the output is those weights times the values."""
    key = jax.random.key(3)
    out, w = flaxattn.dot_product_attention(q, k, v, dropout_rate=case.dropout, dropout_key=key,
                                            return_weights=True, **case.keywords())  # fmt: skip
    _, w0 = flaxattn.dot_product_attention(q, k, v, return_weights=True, **case.keywords())
    kept = np.asarray(w) != 0
    np.testing.assert_allclose(np.asarray(w)[kept], np.asarray(w0)[kept] / (1 - case.dropout),
                               rtol=1e-5)  # fmt: skip
    assert abs((~kept).mean() - case.dropout) < 0.06
    G = case.N // case.K
    v_rep = np.repeat(np.asarray(v, np.float32), G, axis=2)
    want = np.einsum("bnts,bsnv->btnv", np.asarray(w), v_rep)
    # The output is rounded to the inputs' dtype: 16-bit outputs get that dtype's tolerance.
    tol = dict(atol=2e-5) if q.dtype == jnp.float32 else TOLERANCES[str(q.dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float32), want, **tol)


@functools.cache
def _all_features_seen() -> set[str]:
    """Every registry feature some case uses (with its dropout and return options)."""
    seen = set()
    for case in CASES:
        arrays = case.inputs()
        kw = case.keywords()
        if case.dropout:
            kw.update(dropout_rate=case.dropout, dropout_key=jax.random.key(0))
        call = prepare(arrays["query"], arrays["key"], arrays["value"], arrays["bias"],
                       arrays["mask"], return_residual=True, **kw)  # fmt: skip
        seen |= {f for f in get_implementation("reference").supports if call.uses(f)}
    return seen


def test_the_cases_use_every_feature_but_weights_and_traced_scales():
    """The matrix reaches every feature; weights and traced scales have their own tests."""
    from flaxattn.kernels import FEATURES

    missing = set(FEATURES) - _all_features_seen() - {"weights", "traced_scale", "mod_arrays"}
    assert not missing, missing


@pytest.mark.parametrize("name", ["reference", "blocked", "xla"])
def test_the_registry_states_whether_the_logsumexp_carries_gradients(name):
    """`residual_grad` is what autodiff does: jax.nn's residual is a constant to it."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 2, 4)), jnp.float32)
    lse_grad = jax.grad(lambda q: flaxattn.dot_product_attention(
        q, q, q, implementation=name, return_residual=True)[1].sum())(q)  # fmt: skip
    assert bool(jnp.any(lse_grad != 0)) == get_implementation(name).residual_grad
