"""Which keys each query may see, as index arithmetic shared by every implementation.

Causal, local-window and length masks are never stored as `[T, S]` arrays here: they are
predicates on `(q_idx, kv_idx)` plus per-example limits, so the reference kernel can build a
dense mask from them and the blocked kernel can compute which key blocks are empty.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


class Limits(NamedTuple):
    """Per-example visibility limits, each `[B]` int32 (or a scalar inside a per-example map).

    A query at index `i` sits at position `i + offset` on the key axis. It sees key `j` iff
    `i < q_len`, `j < kv_len`, and the causal / window conditions hold at that position.
    """

    q_len: ArrayLike
    kv_len: ArrayLike
    offset: ArrayLike


@dataclasses.dataclass(frozen=True)
class Visibility:
    """Structured masks: causal, local window and sequence lengths.

    Attributes:
      is_causal: keys after the query's position are hidden.
      window: `(left, right)`: only keys within `[pos - left, pos + right]` are visible.
      q_lengths: `[B]` valid query lengths; rows past them see nothing (output 0).
      kv_lengths: `[B]` valid key lengths; keys past them are hidden.
      causal_alignment: `"top_left"` (query 0 is at key 0, as in jax.nn) or
        `"bottom_right"` (the last valid query is at the last valid key; used when decoding
        with a cache, where the queries are the newest tokens).
    """

    is_causal: bool = False
    window: tuple[int, int] | None = None
    q_lengths: ArrayLike | None = None
    kv_lengths: ArrayLike | None = None
    causal_alignment: str = "top_left"

    @property
    def is_trivial(self) -> bool:
        """True when every query sees every key."""
        return (
            not self.is_causal
            and self.window is None
            and self.q_lengths is None
            and self.kv_lengths is None
        )

    def limits(self, batch: int, q_len: int, kv_len: int) -> Limits:
        """Per-example limits `[B]` for queries of length `q_len` over keys of length `kv_len`."""
        full = jnp.ones((batch,), jnp.int32)
        q = full * q_len if self.q_lengths is None else self.q_lengths.astype(jnp.int32)
        kv = full * kv_len if self.kv_lengths is None else self.kv_lengths.astype(jnp.int32)
        offset = kv - q if self.causal_alignment == "bottom_right" else jnp.zeros_like(q)
        return Limits(q, kv, offset)

    def visible(self, q_idx: ArrayLike, kv_idx: ArrayLike, limits: Limits) -> Array:
        """Boolean visibility for broadcastable index arrays and scalar (per-example) limits."""
        ok = (q_idx < limits.q_len) & (kv_idx < limits.kv_len)
        pos = q_idx + limits.offset
        if self.is_causal:
            ok &= kv_idx <= pos
        if self.window is not None:
            left, right = self.window
            ok &= (kv_idx >= pos - left) & (kv_idx <= pos + right)
        return ok

    def key_range(
        self, q_start: ArrayLike, q_stop: ArrayLike, limits: Limits
    ) -> tuple[Array, Array]:
        """Half-open range `[lo, hi)` of keys visible to any query in `[q_start, q_stop)`.

        Blocks outside it are empty and can be skipped. `hi <= lo` means nothing is visible.
        """
        q_stop = jnp.minimum(q_stop, limits.q_len)
        lo = jnp.zeros_like(q_start)
        hi = limits.kv_len + jnp.zeros_like(q_start)
        last = q_stop - 1 + limits.offset  # position of the last query in the range
        if self.is_causal:
            hi = jnp.minimum(hi, last + 1)
        if self.window is not None:
            left, right = self.window
            lo = jnp.maximum(lo, q_start + limits.offset - left)
            hi = jnp.minimum(hi, last + right + 1)
        hi = jnp.where(q_stop > q_start, hi, lo)
        return lo, hi
