"""Shared test helpers: PRNG fixtures and an independent numpy oracle for attention.

Kept minimal and side-effect free: nothing here changes global JAX configuration. Test
modules that want strict shapes opt in with
`pytestmark = pytest.mark.usefixtures("strict_rank_promotion")`.
"""

from __future__ import annotations

import os
import re
import types

import jax
import numpy as np
import pytest

# Tolerances used across the kernel tests, stated once. float32 results are compared with a
# float64 numpy oracle (or with jax.nn, which also works in float32); bf16 / fp16 results
# differ from those by the rounding of the inputs' dtype (bf16 has an 8-bit mantissa, fp16
# 11 bits) on outputs of magnitude ~1.
TOLERANCES = {
    "float32": dict(atol=2e-5, rtol=2e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
    "float16": dict(atol=3e-3, rtol=3e-3),
}


@pytest.fixture(scope="module")
def strict_rank_promotion():
    """Run a module with `jax_numpy_rank_promotion='raise'` (implicit rank broadcasting is an
    error), restored afterwards. Thread-local and scoped, so other modules are unaffected."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator for each test."""
    return np.random.default_rng(0)


@pytest.fixture
def prng_key() -> jax.Array:
    """A fresh typed JAX PRNG key for each test."""
    return jax.random.key(0)


# --- The numpy oracle: written from the formulas, independent of flaxattn's code. ---------


def np_visibility(
    B: int,
    T: int,
    S: int,
    *,
    is_causal: bool = False,
    window: int | tuple[int, int] | None = None,
    q_lengths=None,
    kv_lengths=None,
    alignment: str = "top_left",
) -> np.ndarray:
    """Dense `[B, 1, T, S]` visibility built element by element.

    Query `i` of example `b` sits at key position `p = i` (top-left) or
    `p = kv_len - q_len + i` (bottom-right). It sees key `j` iff `i < q_len`, `j < kv_len`,
    `j <= p` when causal and `p - left <= j <= p + right` with a window.
    """
    if isinstance(window, int):
        window = (window, window)
    out = np.zeros((B, 1, T, S), bool)
    for b in range(B):
        q_len = T if q_lengths is None else int(q_lengths[b])
        kv_len = S if kv_lengths is None else int(kv_lengths[b])
        offset = kv_len - q_len if alignment == "bottom_right" else 0
        for i in range(T):
            for j in range(S):
                if i >= q_len or j >= kv_len:
                    continue
                p = i + offset
                if is_causal and j > p:
                    continue
                if window is not None and not (p - window[0] <= j <= p + window[1]):
                    continue
                out[b, 0, i, j] = True
    return out


def np_attention(q, k, v, *, bias=None, mask=None, scale=None, logits_fn=None):
    """Grouped-query attention in float64 numpy, with output 0 for rows with nothing visible.

    Args:
      q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]` (K divides N; query head `n`
        uses kv head `n // (N // K)`).
      bias, mask: broadcastable to `[B, N, T, S]` (mask boolean, True = attend).
      scale: default `1 / sqrt(H)`.
      logits_fn: optional `(q [T, D], k [S, E], n) -> [T, S]` replacing the scaled dot product
        for head `n` (for other score functions).

    Returns:
      `(out [B, T, N, Hv], weights [B, N, T, S], lse [B, N, T])`, float64; the lse of an empty
      row is -inf.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    k_rep = np.repeat(k, G, axis=2)  # [B, S, N, H]
    v_rep = np.repeat(v, G, axis=2)
    if logits_fn is None:
        scale = 1.0 / np.sqrt(H) if scale is None else scale
        logits = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
    else:
        logits = np.zeros((B, N, T, S))
        for b in range(B):
            for n in range(N):
                logits[b, n] = logits_fn(q[b, :, n], k_rep[b, :, n], n)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    visible = np.broadcast_to(True if mask is None else np.asarray(mask, bool), (B, N, T, S))
    logits = np.where(visible, logits, -np.inf)
    any_visible = visible.any(-1, keepdims=True)
    row_max = np.where(any_visible, logits.max(-1, keepdims=True, initial=-np.inf), 0.0)
    e = np.where(visible, np.exp(logits - row_max), 0.0)
    total = e.sum(-1, keepdims=True)
    weights = e / np.where(total == 0, 1.0, total)
    out = np.einsum("bnts,bsnh->btnh", weights, v_rep)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)) + row_max, -np.inf)
    return out, weights, lse[..., 0]


def make_qkv(rng: np.random.Generator, B, T, S, N, K, H, Hv=None, dtype=np.float32):
    """Random `q [B, T, N, H]`, `k [B, S, K, H]`, `v [B, S, K, Hv]` as jax arrays of `dtype`."""
    Hv = H if Hv is None else Hv
    shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, Hv)]
    return tuple(jax.numpy.asarray(rng.standard_normal(s), dtype) for s in shapes)


@pytest.fixture(scope="session")
def oracle() -> types.SimpleNamespace:
    """`oracle.attention`, `oracle.visibility`, `oracle.qkv` and `oracle.tol` (see above)."""
    return types.SimpleNamespace(
        attention=np_attention, visibility=np_visibility, qkv=make_qkv, tol=TOLERANCES
    )


# --- Several CPU devices (the `multidevice` tests) ----------------------------------------


def pytest_configure(config):
    """A session that selects the `multidevice` tests gets 8 CPU devices: XLA reads the flag
    when its CPU client starts, which is after this hook (importing jax does not start it)."""
    expression = config.getoption("markexpr") or ""
    if re.search(r"(?<!not )\bmultidevice\b", expression) and "device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()


@pytest.fixture
def devices8() -> list:
    """The 8 CPU devices of a `multidevice` session; a clear failure without them."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail(
            "this test needs 8 devices: run it as `pytest -m multidevice` (or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8); `make test` does."
        )
    return devices
