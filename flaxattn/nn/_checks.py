"""Argument checks shared by the modules: a `ValueError` that names the argument."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def check_positive(name: str, value: Any) -> None:
    """A `ValueError` unless `value` is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def check_tokens(name: str, tokens: Any) -> None:
    """A `ValueError` unless `tokens` is an int array `[B, T]`."""
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an int array [B, T], got {getattr(tokens, 'dtype', type(tokens))} "
            f"shape {getattr(tokens, 'shape', None)}."
        )
