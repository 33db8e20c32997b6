"""Positional information: added to embeddings (sinusoidal, learned), rotated into q/k
(RoPE), or added to the logits through the kernels' `bias` (ALiBi, T5 relative)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.kernels import t5_relative_bias


def sinusoidal_encoding(
    positions: Int[ArrayLike, "*B T"], d_model: int
) -> Float[Array, "*B T D"]:
    """Fixed sinusoidal encodings (Vaswani et al. 2017), float32.

        PE[p, 2i] = sin(p / 10000^(2i / D)),   PE[p, 2i + 1] = cos(p / 10000^(2i / D))
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encodings need an even d_model, got {d_model}.")
    inv_freq = 10_000.0 ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)  # [D/2]
    positions = jnp.asarray(positions, jnp.float32)[..., None]  # [*B, T, 1]
    angle = positions * inv_freq.reshape((1,) * (positions.ndim - 1) + (-1,))  # [*B, T, D/2]
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*angle.shape[:-1], -1)


class LearnedPositionalEmbedding(nnx.Module):
    """Learned absolute position embeddings: a `[max_len, D]` table looked up by position."""

    def __init__(self, max_len: int, d_model: int, *, rngs: nnx.Rngs):
        self.max_len = max_len
        self.embedding = nnx.Embed(
            max_len, d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )

    def __call__(self, positions: Int[ArrayLike, "*B T"]) -> Float[Array, "*B T D"]:
        """Embeddings of `positions`; the caller keeps them below `max_len` (checked there)."""
        return self.embedding(positions)


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary position embedding settings (Su et al. 2021, "RoFormer").

    Pairs of head dims `(i, i + R/2)` are rotated by the angle `p · base^(-2i/R)`, where `p` is
    the token's position and `R` the number of rotated dims, so `q · k` depends on positions
    only through their difference.
    """

    base: float = 10_000.0  # wavelength base
    fraction: float = 1.0  # fraction of each head's dims that are rotated (rounded to even)

    def rotated_dims(self, head_dim: int) -> int:
        """R: the even number of rotated dims of a head of size `head_dim`."""
        return int(head_dim * self.fraction) // 2 * 2


def apply_rope(
    x: Float[ArrayLike, "B T N H"], positions: Int[ArrayLike, "*B T"], rope: RoPE
) -> Float[Array, "B T N H"]:
    """Rotate `x` by its positions (half-split pairing, as in GPT-NeoX and Gemma).

    Args:
      x: queries or keys, `[B, T, N, H]`.
      positions: `[T]` or `[B, T]` integer positions (they continue past a KV cache's index).
      rope: the settings.

    Returns:
      `[B, T, N, H]` in `x`'s dtype; dims past `R` are unchanged.
    """
    R = rope.rotated_dims(x.shape[-1])
    half = R // 2
    inv_freq = rope.base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [R/2]
    positions = jnp.asarray(positions, jnp.float32)[..., None]  # [*B, T, 1]
    angle = positions * inv_freq.reshape((1,) * (positions.ndim - 1) + (-1,))  # [*B, T, R/2]
    angle = angle.reshape((1,) * (3 - angle.ndim) + angle.shape)  # [B|1, T, R/2]
    sin = jnp.sin(angle)[..., None, :]  # [B|1, T, 1, R/2]
    cos = jnp.cos(angle)[..., None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:R].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., R:]], axis=-1)


class T5RelativeBias(nnx.Module):
    """T5's learned, bucketed relative-position bias (Raffel et al. 2020), one per stack.

    A thin shell over `flaxattn.t5_relative_bias`: it holds the `[num_buckets, N]` table.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        bidirectional: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        rngs: nnx.Rngs,
    ):
        self.bidirectional = bidirectional
        self.max_distance = max_distance
        init = nnx.initializers.normal(0.02)
        self.table = nnx.Param(init(rngs.params(), (num_buckets, num_heads)))  # [R, N]

    def __call__(self, T: int, S: int | None = None, *, offset: int | Array = 0) -> Array:
        """`[1, N, T, S]` bias; `offset` is query 0's position on the key axis."""
        return t5_relative_bias(
            self.table[...], T, S, bidirectional=self.bidirectional,
            max_distance=self.max_distance, offset=offset,
        )
