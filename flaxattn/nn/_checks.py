"""Argument checks shared by the modules: a `ValueError` that names the argument."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flaxattn._deprecated import warn_deprecated


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


def attention_choice(owner: str, attention: Any, attention_fn: Any, default: Any = None) -> Any:
    """The one attention choice of a layer, stack or model: `attention` (a name or a function),
    or the deprecated `attention_fn`, or `default` (e.g. the config's `implementation`)."""
    if attention_fn is not None:
        if attention is not None:
            raise ValueError(f"{owner}: pass attention or attention_fn, not both.")
        warn_deprecated(f"{owner}(attention_fn=...)", "attention=... (a name or a function)")
        attention = attention_fn
    return default if attention is None else attention
