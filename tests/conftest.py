"""Shared test helpers: PRNG fixtures, the float64 reference of `flaxattn.testing` as a fixture,
and the 8-device set-up of the `multidevice` tests.

The whole suite runs with `jax_numpy_rank_promotion='raise'` (set below) and with jaxtyping's
shape checks on every annotated function of flaxattn (`--jaxtyping-packages` in pyproject's
pytest options).
"""

from __future__ import annotations

import os
import re
import types

import jax
import numpy as np
import pytest

# Implicit rank promotion is an error in every test (as in flax's suite): a broadcast that
# adds axes must be written out.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tolerances of the kernel tests that compare the reference implementation with jax.nn or the
# float64 reference: bf16 / fp16 results differ by the rounding of the inputs' dtype (bf16 has
# an 8-bit mantissa, fp16 11 bits) on outputs of magnitude ~1. (The conformance suite's are
# `flaxattn.testing.TOLERANCES`, wider for the 16-bit products of the tiled kernels.)
TOLERANCES = {
    "float32": dict(atol=2e-5, rtol=2e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
    "float16": dict(atol=3e-3, rtol=3e-3),
}


@pytest.fixture
def unchecked():
    """jaxtyping's checks off for one test. Error tests assert flaxattn's own messages, the ones
    users get (the annotation checks exist only under pytest and would answer first)."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator for each test."""
    return np.random.default_rng(0)


@pytest.fixture
def prng_key() -> jax.Array:
    """A fresh typed JAX PRNG key for each test."""
    return jax.random.key(0)


# --- The float64 reference (flaxattn.testing), in the shapes these tests use. -----------


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
    """Dense `[B, 1, T, S]` visibility (`flaxattn.testing.visibility`)."""
    from flaxattn import testing  # not at import: jaxtyping's hook must see flaxattn first

    return testing.visibility(B, T, S, is_causal=is_causal, window=window, q_lengths=q_lengths,
                              kv_lengths=kv_lengths, causal_alignment=alignment)[:, None]


def np_attention(q, k, v, *, bias=None, mask=None, scale=None, logits_fn=None):
    """`(out [B, T, N, Hv], weights [B, N, T, S], lse [B, N, T])` of `flaxattn.testing.reference`
    in float64; `logits_fn(q [T, D], k [S, E], n) -> [T, S]` replaces the scaled dot product."""
    from flaxattn import testing

    ref = testing.reference(q, k, v, bias, mask, scale=scale, logits_fn=logits_fn,
                            return_weights=True)  # fmt: skip
    return ref.out, ref.weights, ref.lse


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
