"""Tiny configurations and helpers shared by the flaxattn.nn tests (imported as a module).

Test inputs come from numpy and checks run in numpy: in eager JAX every new shape compiles
its own small program, and those compiles would dominate the run time of these tests.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import flaxattn.nn as fnn

VOCAB = 13


def rngs(seed: int = 0, dropout: int | None = None) -> nnx.Rngs:
    """`nnx.Rngs` with RBG keys: their random draws compile in half the time of threefry's,
    and parameter initialisation is most of these small tests' compile time."""
    key = lambda s: jax.random.key(s, impl="rbg")
    return nnx.Rngs(key(seed)) if dropout is None else nnx.Rngs(key(seed), dropout=key(dropout))


def tiny_config(**overrides) -> fnn.TransformerConfig:
    """A Transformer small enough to compile in a second or two."""
    settings = dict(vocab_size=VOCAB, d_model=16, num_heads=4, num_kv_heads=2, num_layers=1,
                    d_ff=32, max_len=24)
    return fnn.TransformerConfig(**{**settings, **overrides})


def tokens(seed: int, shape: tuple[int, ...], vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


def assert_useful_grads(grads: nnx.State) -> None:
    """Every parameter gradient is finite, and not all of them are zero."""
    leaves = [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(np.abs(g).sum() for g in leaves) > 0.0
