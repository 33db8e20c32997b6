"""Nadaraya-Watson kernel regression as attention pooling: the smallest attention model.

    f(q) = Σ_s softmax_s(-(q - k_s)² / (2h²)) v_s          (Nadaraya 1964, Watson 1964)

A Gaussian kernel normalised over the keys is a softmax over the scores `-(q - k)² / (2h²)`,
so the pooling is `flaxattn.scored_attention` with that score function.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.kernels import scored_attention
from flaxattn.nn._capture import Capturable


def gaussian_score(
    query: Float[ArrayLike, "T 1"],
    key: Float[ArrayLike, "S 1"],
    inverse_two_h2: Float[ArrayLike, ""],
) -> Float[Array, "T S"]:
    """One head's Gaussian-kernel logits `-(q - k)² / (2h²)`, scalars per position."""
    return -jnp.square(query - key.T).astype(jnp.float32) * inverse_two_h2


class NadarayaWatson(Capturable, nnx.Module):
    """Nadaraya-Watson regression of scalars, with a fixed or a learned bandwidth `h`.

    Args:
      learn_bandwidth: learn `log h` (a parameter) or keep `h = bandwidth` fixed.
      bandwidth: `h`, or its initial value.
      rngs: accepted for a uniform constructor; there is nothing random to initialise.
    """

    def __init__(self, *, learn_bandwidth: bool, bandwidth: float = 1.0, rngs: nnx.Rngs):
        del rngs
        if not bandwidth > 0.0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}.")
        self.kind = "cross"
        self.num_heads = 1
        self.capture = None
        self.bandwidth = float(bandwidth)
        self.log_bandwidth = (
            nnx.Param(jnp.log(jnp.float32(bandwidth))) if learn_bandwidth else nnx.data(None)
        )

    @property
    def h(self) -> Array:
        """The current bandwidth."""
        if self.log_bandwidth is None:
            return jnp.float32(self.bandwidth)
        return jnp.exp(self.log_bandwidth[...])

    def __call__(
        self,
        queries: Float[ArrayLike, "B T"],
        keys: Float[ArrayLike, "B S"],
        values: Float[ArrayLike, "B S"],
        *,
        key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
    ) -> Float[Array, "B T"]:
        """Predictions `[B, T]` at `queries` from the pairs `(keys, values)` `[B, S]`."""
        for name, x in (("queries", queries), ("keys", keys), ("values", values)):
            if jnp.ndim(x) != 2:
                raise ValueError(f"{name} must have shape [B, length], got {jnp.shape(x)}.")
        if keys.shape != values.shape:
            raise ValueError(f"keys and values must have one shape, got {keys.shape} and "
                             f"{values.shape}.")
        inverse_two_h2 = 1.0 / (2.0 * jnp.square(self.h))
        as_heads = lambda x: jnp.asarray(x, jnp.float32)[:, :, None, None]  # [B, L, 1, 1]
        results = scored_attention(
            as_heads(queries), as_heads(keys), as_heads(values), score_fn=gaussian_score,
            score_params=(inverse_two_h2[None],), key_value_seq_lengths=key_value_seq_lengths,
            return_weights=self.capture is not None,
        )
        if self.capture is not None:
            out, weights = results
            self.record_weights(weights)
        else:
            out = results
        return out[:, :, 0, 0]
