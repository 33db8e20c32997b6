"""Module state saved with orbax and restored into a fresh model round-trips exactly."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from nn_testing import assert_close, rngs, tiny_config, tokens

import flaxattn.nn as fnn


def _leaves(state: nnx.State) -> list[np.ndarray]:
    as_numpy = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x)
    return [as_numpy(x) for x in jax.tree.leaves(state)]


def test_orbax_round_trip(tmp_path):
    config = tiny_config(positional="t5", dropout_rate=0.1)  # params and RNG state
    model = fnn.DecoderLM(config, rngs=rngs())
    forward = nnx.jit(lambda m, t, deterministic: m(t, deterministic=deterministic),
                      static_argnums=2)
    forward(model, tokens(0, (2, 5)), False)  # advance the RNG counts
    state = nnx.state(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()

    fresh = fnn.DecoderLM(config, rngs=rngs(1))
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(state),
                                                        _leaves(nnx.state(fresh)), strict=True))
    restored = checkpointer.restore(tmp_path / "state", nnx.state(fresh))
    nnx.update(fresh, restored)
    for a, b in zip(_leaves(state), _leaves(nnx.state(fresh)), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    toks = tokens(2, (2, 5))
    assert_close(forward(fresh, toks, True), forward(model, toks, True), atol=0, rtol=0)
