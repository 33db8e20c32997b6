"""Activation patching: one head's output (or attention pattern) from one run put into another.

    patched[l, n] = metric(target run, with head (l, n) as in the source run)
    recovered     = (patched - metric(corrupted)) / (metric(clean) - metric(corrupted))

Denoising (source = clean, target = corrupted) asks which heads suffice to bring the clean
behaviour back; noising (source = corrupted, target = clean) asks which heads the behaviour
needs: a recovered fraction near 0 there means that head's clean output was necessary. A
recovered fraction of 1 is the clean metric, 0 the corrupted one, in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from flaxattn.interp._ablation import Metric, head_selectors, replace_heads
from flaxattn.interp._hooks import (
    KernelCall,
    as_function,
    head_layers,
    hooked,
    num_heads,
    record_heads,
)

PATCH_WHAT = ("output", "pattern")
DIRECTIONS = ("noise", "denoise")


def _pattern_hook(selected: Array, weights: Array):
    """Heads where `selected` > 0 attend with `weights [B, N, T, S]` (from the source run) to
    this run's values."""

    def hook(out: Array, call: KernelCall) -> Array:
        return replace_heads(selected, call.output_from(weights))(out, call)

    return hook


def patch_heads(
    model: nnx.Module,
    metric: Metric,
    source: Any,
    target: Any,
    *,
    what: str = "output",
    layers: Sequence[str] | str | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """The metric of the `target` run with each head in turn taken from the `source` run.

    Args:
      model: the model.
      metric: `metric(model, batch)` -> scalar, traced under jit; the patched run computes
        `metric(model, target)`.
      source, target: batches of the same shapes.
      what: `'output'` patches the head's output `[B, T, N, H]` (before the output
        projection); `'pattern'` its attention weights `[B, N, T, S]` (applied to the target
        run's values).
      layers: paths or patterns of the layers (rows, model order); None = all.
      chunk: patched runs at once (None: all `L * N`).

    Returns:
      `[L, N]` float64.
    """
    if what not in PATCH_WHAT:
        raise ValueError(f"what must be one of {PATCH_WHAT}, got {what!r}.")
    shapes = [jax.tree.map(jnp.shape, b) for b in (source, target)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"source and target must have the same shapes, got {shapes[0]} and "
                         f"{shapes[1]}.")
    paths = list(head_layers(model, layers))
    L, N = len(paths), num_heads(head_layers(model, paths))
    rebuild, state = as_function(model)
    make_hook = replace_heads if what == "output" else _pattern_hook

    @jax.jit
    def patched(state, source, target):
        _, recorded = record_heads(rebuild(state), metric, source, layers=paths,
                                   weights=what == "pattern")

        def one(selector):  # [L, N]
            m = rebuild(state)
            hooks = {p: make_hook(selector[i], recorded[p]) for i, p in enumerate(paths)}
            with hooked(m, hooks):
                return jnp.asarray(metric(m, target), jnp.float32)

        return jax.lax.map(one, head_selectors(L, N), batch_size=chunk or L * N)

    return np.asarray(patched(state, source, target), np.float64).reshape(L, N)


def recovered_fraction(patched, clean: float, corrupted: float) -> np.ndarray:
    """`(patched - corrupted) / (clean - corrupted)`: 1 = the clean metric, 0 = the corrupted.

    Raises a ValueError when clean and corrupted metrics are equal (nothing to recover).
    """
    gap = float(clean) - float(corrupted)
    if gap == 0.0:
        raise ValueError(f"clean and corrupted metrics are equal ({clean}); the corruption "
                         "changes nothing to recover.")
    return (np.asarray(patched, np.float64) - float(corrupted)) / gap


def patching_table(
    model: nnx.Module,
    metric: Metric,
    clean: Any,
    corrupted: Any,
    *,
    direction: str = "noise",
    what: str = "output",
    layers: Sequence[str] | str | None = None,
    chunk: int | None = None,
) -> dict[str, Any]:
    """Recovered fraction per head `[L, N]` for a clean / corrupted pair of batches.

    Args:
      model, metric, what, layers, chunk: as in `patch_heads`.
      clean, corrupted: batches of the same shapes (the metric differs between them).
      direction: `'noise'`: the clean run with one head from the corrupted run; `'denoise'`:
        the corrupted run with one head from the clean run.

    Returns:
      `{'recovered': [L, N], 'patched': [L, N], 'clean': float, 'corrupted': float,
      'layers': [path, ...]}`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    rebuild, state = as_function(model)
    both = jax.jit(lambda s, a, b: (metric(rebuild(s), a), metric(rebuild(s), b)))
    clean_m, corrupted_m = (float(x) for x in both(state, clean, corrupted))
    source, target = (corrupted, clean) if direction == "noise" else (clean, corrupted)
    patched = patch_heads(model, metric, source, target, what=what, layers=layers, chunk=chunk)
    return {
        "recovered": recovered_fraction(patched, clean_m, corrupted_m),
        "patched": patched,
        "clean": clean_m,
        "corrupted": corrupted_m,
        "layers": list(head_layers(model, layers)),
    }
