"""Adding a backend is one `register` call (the README's contributor example): the new name then
works through `dot_product_attention`, the modules' `attention=` and `choose_implementation`'s
checks, and what it does not support is refused with the registry's one error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxattn
from flaxattn import nn
from flaxattn.kernels import Implementation, _registry, register
from flaxattn.kernels._call import Call, Result
from flaxattn.testing import TOLERANCES, reference


def _run(call: Call) -> Result:
    """Plain softmax attention, no masks of any kind: the smallest backend there is."""
    s = jnp.einsum("btnh,bsnh->bnts", call.query, call.key).astype(jnp.float32) * call.scale
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), call.value)
    return Result(out.astype(call.query.dtype))


@pytest.fixture
def mine(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # undone after
    return register(Implementation("mine", _run, "plain softmax attention, for the test",
                                   supports=frozenset()))  # fmt: skip


def test_a_registered_backend_is_reachable_everywhere(mine):
    assert "mine" in flaxattn.implementations()
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((2, 9, 4, 8)).astype(np.float32) for _ in range(3))
    out = jax.jit(lambda q, k, v: flaxattn.dot_product_attention(
        q, k, v, implementation="mine"))(q, k, v)  # fmt: skip
    np.testing.assert_allclose(out, reference(q, k, v).out, **TOLERANCES["float32"])

    layer = nn.MultiHeadAttention(num_heads=4, in_features=16, attention="mine",
                                  rngs=nnx.Rngs(0))  # fmt: skip
    assert layer(jnp.ones((2, 5, 16))).shape == (2, 5, 16)


@pytest.mark.parametrize(
    "keywords, feature",
    [(dict(is_causal=True), "is_causal"), (dict(return_weights=True), "return_weights")],
)
def test_what_it_does_not_support_is_refused_with_the_registry_error(mine, keywords, feature):
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match=rf"implementation='mine' does not support {feature}; "
                                         "implementations that do: reference"):  # fmt: skip
        flaxattn.dot_product_attention(q, q, q, implementation="mine", **keywords)


def test_a_taken_name_is_refused(mine):
    with pytest.raises(ValueError, match="already registered"):
        register(Implementation("mine", _run, "again"))
