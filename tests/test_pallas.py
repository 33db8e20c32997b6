"""Pallas flash attention, checked on CPU in interpret mode against a naive dense reference.

No accelerator is needed: the kernels run in Pallas interpret mode, and the lowering tests
lower them for CUDA (Triton) and TPU (Mosaic) from this machine without compiling them.
Shapes are tiny because interpret mode compiles slowly; one jitted function per case returns
the output, the logsumexp and all three gradients, so each case compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxattn
from flaxattn.kernels import prefix_lm_mask_mod, soft_cap_score_mod
from flaxattn.kernels._pallas import pallas_attention
from flaxattn.kernels._visibility import Visibility


def naive_attention(q, k, v, *, scale, causal=False, alignment="top_left", window=None,
                    q_len=None, kv_len=None, score_mod=None, mask_mod=None):
    """Dense float32 attention with K/V repeated per group: `(out [B,T,N,Hv], lse [B,N,T])`."""
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    k = jnp.repeat(k, N // K, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, N // K, axis=2).astype(jnp.float32)
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k,
                   precision=jax.lax.Precision.HIGHEST) * scale
    qi, ki = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    if score_mod is not None:
        s = score_mod(s, qi, ki)
    q_len = jnp.full((B,), T) if q_len is None else q_len
    kv_len = jnp.full((B,), S) if kv_len is None else kv_len
    offset = kv_len - q_len if alignment == "bottom_right" else jnp.zeros((B,), int)
    pos = qi[None] + offset[:, None, None]  # [B, T, 1]
    ok = (qi[None] < q_len[:, None, None]) & (ki[None] < kv_len[:, None, None])
    if causal:
        ok &= ki[None] <= pos
    if window is not None:
        ok &= (ki[None] >= pos - window[0]) & (ki[None] <= pos + window[1])
    if mask_mod is not None:
        ok &= mask_mod(qi, ki)[None]
    ok = ok[:, None]  # [B, 1, T, S]
    s = jnp.where(ok, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(ok, jnp.exp(s - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    w = e / jnp.where(z > 0, z, 1.0)
    out = jnp.einsum("bnts,bsnh->btnh", w, v, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(z[..., 0] > 0, jnp.log(jnp.where(z > 0, z, 1.0))[..., 0] + m[..., 0],
                    -jnp.inf)
    return out, lse


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


CASES = [
    Case("T=16, S=16, full, float16", dtype="float16"),
    Case("T=33, S=33, causal top-left, mqa, blocks 16x8", T=33, S=33, N=3, K=1, causal=True,
         blocks=(16, 8)),
    Case("T=7, S=33, causal bottom-right, gqa=2", T=7, S=33, N=4, K=2, causal=True,
         alignment="bottom_right"),
    Case("T=33, S=7, bottom-right empty rows, lengths incl. an empty example", T=33, S=7,
         causal=True, alignment="bottom_right", q_len=(20, 33), kv_len=(0, 7)),
    Case("T=33, S=16, window (3, 2), lengths", T=33, S=16, window=(3, 2), q_len=(33, 9),
         kv_len=(11, 16)),
    Case("T=16, S=33, causal + window + lengths, bottom-right, gqa=2", T=16, S=33, N=4, K=2,
         causal=True, alignment="bottom_right", window=(5, 0), q_len=(16, 9), kv_len=(30, 20)),
    Case("T=1, S=7, decode, H=8, Hv=4, default blocks", T=1, S=7, H=8, Hv=4, causal=True,
         alignment="bottom_right", N=4, K=1, blocks=None),
    Case("T=33, S=33, soft-cap score_mod + prefix mask_mod", T=33, S=33, soft_cap=2.0,
         prefix=5, causal=True),
    Case("T=33, S=33, bfloat16, causal, gqa=2", T=33, S=33, N=4, K=2, dtype="bfloat16",
         causal=True, blocks=(16, 16)),
]

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
    naive = functools.partial(
        naive_attention, scale=scale, causal=case.causal, alignment=case.alignment,
        window=case.window, q_len=q_len, kv_len=kv_len, score_mod=score_mod, mask_mod=mask_mod)
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    got = jit(functools.partial(_with_grads, kernel))(q, k, v, w)
    want = jit(functools.partial(_with_grads, naive))(q, k, v, w)

    out, lse = got[0], got[1]
    assert out.dtype == q.dtype and out.shape == (case.B, case.T, case.N, case.Hv or case.H)
    assert lse.dtype == jnp.float32 and lse.shape == (case.B, case.N, case.T)
    empty = np.isneginf(np.asarray(want[1]))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[np.moveaxis(empty, 1, 2)], 0.0)
    tol = TOLERANCE[case.dtype]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a[np.isfinite(b)]).all(), name
        a, b = np.where(np.isfinite(b), a, 0.0), np.where(np.isfinite(b), b, 0.0)
        scale_ = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale_, rtol=tol, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_kernels_match_naive_attention(case):
    _check_case(case, "triton")


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


def test_public_entry_point_with_pallas():
    q, k, v, w = _inputs(Case("api", T=33, S=33, N=4, K=2))
    kwargs = dict(is_causal=True, key_value_seq_lengths=jnp.array([33, 20]),
                  local_window_size=(8, 0), return_residual=True, block_sizes=(16, 16))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v):
        pallas = flaxattn.dot_product_attention(q, k, v, implementation="pallas", **kwargs)
        reference = flaxattn.dot_product_attention(q, k, v, implementation="reference", **kwargs)
        return pallas, reference

    (out, res), (ref_out, ref_res) = run(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    np.testing.assert_allclose(res, ref_res, atol=2e-5)


_DOCUMENT_IDS = jnp.arange(16) // 4


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
