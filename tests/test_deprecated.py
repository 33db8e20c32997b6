"""Every name that moved in 0.2 (CHANGELOG.md) still resolves, to its new home, with a
DeprecationWarning that names the replacement; other unknown names stay AttributeErrors."""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    ("flaxattn", "attention", "flaxattn.kernels", "scored_attention"),
    ("flaxattn", "make_ring_attention_fn", "flaxattn.kernels", "ring_attention_fn"),
    ("flaxattn", "alibi_slopes", "flaxattn.kernels", "alibi_slopes"),
    ("flaxattn.kernels", "attention", "flaxattn.kernels", "scored_attention"),
    ("flaxattn.kernels", "make_ring_attention_fn", "flaxattn.kernels", "ring_attention_fn"),
    ("flaxattn.kernels", "IMPLEMENTATIONS", "flaxattn._compat", "IMPLEMENTATIONS"),
    ("flaxattn.kernels", "BLOCKED_MIN_KV_LENGTH", "flaxattn._compat", "BLOCKED_MIN_KV_LENGTH"),
    ("flaxattn.kernels", "Visibility", "flaxattn.kernels._visibility", "Visibility"),
    ("flaxattn.kernels", "reference_attention", "flaxattn.kernels._reference",
     "reference_attention"),
    ("flaxattn.kernels", "linear_attention", "flaxattn.kernels.efficient", "linear_attention"),
    ("flaxattn.kernels", "favor_projection", "flaxattn.kernels.efficient", "favor_projection"),
    ("flaxattn.benchmarking", "time_interleaved", "flaxattn.bench", "time_interleaved"),
    ("flaxattn.train", "make_mesh", "flaxattn.train._mesh", "training_mesh"),
]  # fmt: skip


@pytest.mark.parametrize("old_module, old, new_module, new", MOVED,
                         ids=[f"{m}.{n}" for m, n, _, _ in MOVED])  # fmt: skip
def test_moved_names_resolve_with_a_warning(old_module, old, new_module, new):
    module = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match=rf"{old_module}\.{old} is deprecated.*{new}"):
        value = getattr(module, old)
    assert value is getattr(importlib.import_module(new_module), new)


def test_the_old_values_are_the_same():
    """The compatibility constants say what they said in 0.1."""
    import flaxattn

    with pytest.warns(DeprecationWarning):
        names = flaxattn.kernels.IMPLEMENTATIONS
        minimum = flaxattn.kernels.BLOCKED_MIN_KV_LENGTH
    assert set(names) == {"reference", "blocked", "pallas", "xla", "cudnn"}
    assert minimum == flaxattn.kernels.get_implementation("blocked").min_kv_length == 256


@pytest.mark.parametrize("module", ["flaxattn", "flaxattn.kernels", "flaxattn.train"])
def test_other_names_are_still_attribute_errors(module):
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = importlib.import_module(module).no_such_name


def test_the_deprecated_ring_helpers_warn_and_work():
    import jax

    from flaxattn import sharding

    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    with pytest.warns(DeprecationWarning, match="sequence_parallel_attention is deprecated"):
        fn = sharding.sequence_parallel_attention(mesh)
    assert callable(fn)
    with pytest.warns(DeprecationWarning, match="RingOrDense is deprecated"):
        assert callable(sharding.RingOrDense(mesh))
