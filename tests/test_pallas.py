"""What is particular to the Pallas kernels, on CPU without an accelerator.

The Triton kernels (the default off TPU) run every conformance case in interpret mode
(tests/test_conformance.py). Here: the TPU kernels in interpret mode against the float64
reference of `flaxattn.testing` (outputs, logsumexp, and gradients with a cotangent on the
logsumexp too), the TPU simulator, errors, and lowering for CUDA (Triton) and TPU (Mosaic)
from this machine without compiling (which checks the Pallas-level rules). Shapes are tiny
because interpret mode compiles slowly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxattn
from flaxattn import testing
from flaxattn.kernels import prefix_lm_mask_mod, soft_cap_score_mod
from flaxattn.kernels._pallas import pallas_attention
from flaxattn.kernels._visibility import Visibility


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem; `id` is its readable test name."""

    id: str
    B: int = 2
    T: int = 16
    S: int = 16
    N: int = 2
    K: int = 2
    H: int = 16
    Hv: int | None = None
    dtype: str = "float32"
    causal: bool = False
    alignment: str = "top_left"
    window: tuple[int, int] | None = None
    q_len: tuple[int, ...] | None = None
    kv_len: tuple[int, ...] | None = None
    blocks: tuple[int, int] | None = (8, 8)
    soft_cap: float | None = None
    prefix: int | None = None


TPU_CASES = [
    Case("tpu: T=33, S=16, causal + window, bottom-right, lengths, gqa=2, soft-cap", T=33,
         S=16, N=4, K=2, causal=True, window=(6, 0), alignment="bottom_right",
         q_len=(30, 33), kv_len=(16, 0), soft_cap=2.0),
    Case("tpu: T=16, S=33, window, top-left, bfloat16", T=16, S=33, window=(4, 1),
         dtype="bfloat16", blocks=(16, 16)),
]
# Interpret mode spends its time in XLA's CPU compiler; the kernels' code is what is tested.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}


def _inputs(case: Case):
    ks = jax.random.split(jax.random.key(hash(case.id) % 2**31), 4)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.B, case.T, case.N, case.H), dtype)
    k = jax.random.normal(ks[1], (case.B, case.S, case.K, case.H), dtype)
    v = jax.random.normal(ks[2], (case.B, case.S, case.K, case.Hv or case.H), dtype)
    w = jax.random.normal(ks[3], (case.B, case.T, case.N, case.Hv or case.H), jnp.float32)
    return q, k, v, w


def _mods(case: Case):
    score_mod = None if case.soft_cap is None else soft_cap_score_mod(case.soft_cap)
    mask_mod = None if case.prefix is None else prefix_lm_mask_mod(case.prefix)
    return score_mod, mask_mod


def _lengths(case: Case):
    as_array = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    return as_array(case.q_len), as_array(case.kv_len)


def _with_grads(attend, q, k, v, w):
    """`(out, lse, dq, dk, dv)` of `sum(out · w) + sum(lse · u)`, from one jitted function.

    The lse term checks the cotangent path of the logsumexp (`return_residual` users).
    """

    def loss(q, k, v):
        out, lse = attend(q, k, v)
        u = jnp.cos(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
        lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u)
        return jnp.sum(out.astype(jnp.float32) * w) + lse_term, (out, lse)

    grads, (out, lse) = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out, lse, *grads)


def _check_case(case: Case, backend: str):
    q, k, v, w = _inputs(case)
    scale = 0.3
    score_mod, mask_mod = _mods(case)
    q_len, kv_len = _lengths(case)
    vis = Visibility(is_causal=case.causal, window=case.window, q_lengths=q_len,
                     kv_lengths=kv_len, causal_alignment=case.alignment)
    kernel = functools.partial(
        pallas_attention, visibility=vis, scale=scale, score_mod=score_mod, mask_mod=mask_mod,
        block_sizes=case.blocks, backend=backend, interpret=True)
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    got = jit(functools.partial(_with_grads, kernel))(q, k, v, w)
    out, lse = got[0], got[1]
    u = np.cos(np.arange(lse.size, dtype=np.float32)).reshape(lse.shape)  # as in _with_grads
    want = testing.reference(
        *(np.asarray(x, np.float32) for x in (q, k, v)), scale=scale, is_causal=case.causal,
        causal_alignment=case.alignment, local_window_size=case.window, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, score_mod=score_mod, mask_mod=mask_mod,
        d_out=np.asarray(w), d_lse=np.where(np.isfinite(np.asarray(lse)), u, 0.0),
    )
    assert out.dtype == q.dtype and out.shape == (case.B, case.T, case.N, case.Hv or case.H)
    assert lse.dtype == jnp.float32 and lse.shape == (case.B, case.N, case.T)
    empty = np.isneginf(want.lse)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[np.moveaxis(empty, 1, 2)], 0.0)
    tol = TOLERANCE[case.dtype]
    expected = (want.out, want.lse, *want.grads[:3])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        a = np.asarray(a, np.float32)
        assert np.isfinite(a[np.isfinite(b)]).all(), name
        a, b = np.where(np.isfinite(b), a, 0.0), np.where(np.isfinite(b), b, 0.0)
        scale_ = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale_, rtol=tol, err_msg=name)


@pytest.mark.parametrize("case", [
    TPU_CASES[0], pytest.param(TPU_CASES[1], marks=pytest.mark.slow)], ids=lambda c: c.id)
def test_tpu_kernels_match_naive_attention(case):
    _check_case(case, "tpu")


@pytest.mark.slow
def test_tpu_simulator_agrees_with_the_generic_interpreter():
    """`pltpu.InterpretParams` simulates DMAs, VMEM and the parallel grid order of a TPU."""
    from jax.experimental.pallas import tpu as pltpu

    case = TPU_CASES[0]
    q, k, v, w = _inputs(case)
    q_len, kv_len = _lengths(case)
    vis = Visibility(is_causal=True, q_lengths=q_len, kv_lengths=kv_len)

    def run(interpret):
        kernel = functools.partial(pallas_attention, visibility=vis, scale=0.3,
                                   block_sizes=(8, 8), backend="tpu", interpret=interpret)
        return jax.jit(functools.partial(_with_grads, kernel))(q, k, v, w)

    for a, b in zip(run(pltpu.InterpretParams()), run(True), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


_DOCUMENT_IDS = jnp.arange(16) // 4


@pytest.mark.usefixtures("unchecked")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bias=jnp.zeros((1, 1, 16, 16))), "implementation='pallas' does not support bias"),
        (dict(mask=jnp.ones((1, 1, 16, 16), bool)),
         "implementation='pallas' does not support mask"),
        (dict(mask_mod=lambda q, k: k < _DOCUMENT_IDS[q]),
         "implementation='pallas' does not support a score_mod or mask_mod that closes over "
         "arrays"),
        (dict(block_sizes=(8,)), r"block_sizes must be a \(block_q, block_k\) pair"),
    ],
    ids=["bias", "mask", "mask_mod capturing an array", "block_sizes"],
)
def test_unsupported_arguments_raise_value_errors_naming_them(kwargs, message):
    q, k, v, _ = _inputs(Case("errors"))
    with pytest.raises(ValueError, match=message):
        flaxattn.dot_product_attention(q, k, v, scale=0.25, implementation="pallas", **kwargs)
    with pytest.raises(ValueError, match="backend must be one of"):
        pallas_attention(q, k, v, visibility=Visibility(), scale=0.25, backend="cuda")


def test_public_entry_point_rejects_dense_mask_for_pallas():
    q, k, v, _ = _inputs(Case("errors"))
    with pytest.raises(ValueError, match="implementation='pallas' does not support mask"):
        flaxattn.dot_product_attention(q, k, v, mask=jnp.ones((16, 16), bool),
                                       implementation="pallas")


@pytest.mark.parametrize(
    ("backend", "platform", "dtype", "H"),
    [("triton", "cuda", "bfloat16", 128), ("triton", "cuda", "float16", 64),
     ("triton", "cuda", "float32", 256), ("tpu", "tpu", "bfloat16", 128),
     ("tpu", "tpu", "float32", 64)],
)
def test_kernels_lower_for_their_accelerator(backend, platform, dtype, H):
    """Lowering (not compiling) for the real target checks the Pallas-level rules."""
    B, T, N, K = 1, 300, 4, 2
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.dtype(dtype))
    vis = Visibility(is_causal=True, window=(64, 0), kv_lengths=jnp.array([250]))

    def loss(q, k, v):
        out, _ = pallas_attention(q, k, v, visibility=vis, scale=0.1, interpret=False,
                                  backend=backend, score_mod=soft_cap_score_mod(30.0))
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, kv, kv).lower(
        lowering_platforms=(platform,))
    target = "__gpu$xla.gpu.triton" if backend == "triton" else "tpu_custom_call"
    assert lowered.as_text().count(f"@{target}") == 3  # forward, dq, dk/dv
