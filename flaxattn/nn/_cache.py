"""The typed KV cache of one self-attention layer, for autoregressive decoding."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from flaxattn.nn._checks import check_positive


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of the positions decoded so far (a pytree; held in an `nnx.Cache`).

    Attributes:
      key: `[B, L, K, H]`, `L` = max_length. Slots at or past `index` are zeros and are never
        attended to (the layer hides them with `key_value_seq_lengths`).
      value: `[B, L, K, H]`.
      index: `[]` int32, how many positions are written: the slot of the next write, and the
        position of the next token (RoPE and absolute positions continue from it).
    """

    # Shapes in the docstring, not as checked annotations: JAX rebuilds pytrees with other
    # leaves (None, sentinels) in transformations.
    key: Any
    value: Any
    index: Any

    @classmethod
    def zeros(
        cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of at most `max_length` positions."""
        check_positive("batch_size", batch_size)
        check_positive("max_length", max_length)
        shape = (batch_size, max_length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        """L, the number of slots."""
        return self.key.shape[1]

    def append(
        self, key: Float[ArrayLike, "B T K H"], value: Float[ArrayLike, "B T K H"]
    ) -> KVCache:
        """Write `T` new positions at `index` and advance it; writing past `L` is an error.

        The check is on the host when `index` is concrete (a `ValueError`). Under `jit` it is
        a runtime check: the computation fails with the same message instead of letting
        `dynamic_update_slice` clamp the write and silently overwrite earlier positions.
        """
        expected = (self.key.shape[0], key.shape[1]) + self.key.shape[2:]
        if key.shape != expected or value.shape != expected:
            raise ValueError(
                f"KV cache of shape {tuple(self.key.shape)} [B, L, K, H] takes new keys and "
                f"values of shape [B, T, K, H] = {list(expected)}, got {tuple(key.shape)} and "
                f"{tuple(value.shape)}; call init_cache with this batch size."
            )
        T = key.shape[1]
        check = functools.partial(_check_room, length=T, max_length=self.max_length)
        if isinstance(self.index, jax.core.Tracer):
            jax.debug.callback(check, self.index)
        else:
            check(self.index)
        start = (0, self.index, 0, 0)
        return KVCache(
            key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
            value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
            index=self.index + T,
        )


def _check_room(index: ArrayLike, *, length: int, max_length: int) -> None:
    index = int(index)
    if index + length > max_length:
        raise ValueError(
            f"KV cache overflow: writing {length} position(s) at index {index} goes past the "
            f"cache's max_length={max_length}; call init_cache with a larger max_length."
        )
