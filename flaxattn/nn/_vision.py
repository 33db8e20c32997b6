"""Attention for images: a Vision Transformer, and SE / CBAM channel and spatial attention.

- `PatchEmbedding` cuts `[B, H, W, C]` images into `p x p` patches and projects each to `D`
  (a reshape and a dense layer: the same as a stride-`p` convolution).
- `VisionTransformer`: patches, a class token, 2-D positions (sinusoidal, learned, or a learned
  2-D relative bias per head), and the library's `TransformerEncoderLayer`s, so `attention=`,
  `capture_attention`, and `head_interventions` work as for text. Token axis: the class token,
  then the patches row by row (`prefix = 1`).
- `SqueezeExcitation` (Hu et al., 2018) and `CBAM` (Woo et al., 2018) blocks, and
  `CNNClassifier` with either. Their weights, channel `[B, C]` and spatial `[B, H, W]`, are
  recorded only under `capture_image_attention` (a normal call stores nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float

from flaxattn.nn._blocks import TransformerEncoderLayer
from flaxattn.nn._capture import temporarily
from flaxattn.nn._positional import sinusoidal_encoding

VIT_POSITIONAL = ("sinusoidal", "learned", "relative")


class ChannelWeights(nnx.Intermediate):
    """Sown channel attention weights `[B, C]` (SE, CBAM's channel attention)."""


class SpatialMap(nnx.Intermediate):
    """Sown spatial attention maps `[B, H, W]` (CBAM)."""


def _check_images(images: Any, channels: int) -> None:
    shape = jnp.shape(images)
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"images must be [B, H, W, C={channels}], got shape {shape}")


class PatchEmbedding(nnx.Module):
    """Non-overlapping `patch x patch` patches of `[B, H, W, C]` images -> tokens `[B, P, D]`.

    Args:
      patch: patch side in pixels (H and W must be multiples of it).
      channels: C. d_model: D. rngs: initialisation.
    """

    def __init__(self, patch: int, channels: int, d_model: int, *, rngs: nnx.Rngs):
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch, self.channels = patch, channels
        self.proj = nnx.Linear(patch * patch * channels, d_model, rngs=rngs)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """`(rows, cols)` of patches of an `height x width` image."""
        if height % self.patch or width % self.patch:
            raise ValueError(f"image {height}x{width} is not a multiple of patch={self.patch}")
        return height // self.patch, width // self.patch

    def __call__(self, images: Float[ArrayLike, "B H W C"]) -> Float[Array, "B P D"]:
        """Args: `images [B, H, W, C]`. Returns `[B, rows * cols, D]`, patches row by row."""
        _check_images(images, self.channels)
        B, H, W, C = jnp.shape(images)
        (gr, gc), p = self.grid(H, W), self.patch
        x = jnp.reshape(jnp.asarray(images), (B, gr, p, gc, p, C))
        x = jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(B, gr * gc, p * p * C)
        return self.proj(x)


def sinusoidal_2d(rows: int, cols: int, d_model: int) -> Float[Array, "P D"]:
    """2-D sinusoidal positions `[rows * cols, D]`: half of D encodes the row, half the column."""
    if d_model % 4:
        raise ValueError(f"2-D sinusoidal positions need d_model divisible by 4, got {d_model}")
    r = sinusoidal_encoding(jnp.arange(rows), d_model // 2)  # [rows, D/2]
    c = sinusoidal_encoding(jnp.arange(cols), d_model // 2)  # [cols, D/2]
    r = jnp.broadcast_to(r[:, None, :], (rows, cols, d_model // 2))
    c = jnp.broadcast_to(c[None, :, :], (rows, cols, d_model // 2))
    return jnp.concatenate([r, c], axis=-1).reshape(rows * cols, d_model)


class RelativeBias2D(nnx.Module):
    """A learned logit bias per head and 2-D patch offset, `[1, N, T, T]` over `prefix + P`
    tokens (zero on the rows and columns of the prefix tokens)."""

    def __init__(self, num_heads: int, grid: tuple[int, int], prefix: int, *, rngs: nnx.Rngs):
        gr, gc = grid
        self.grid, self.prefix = grid, prefix
        self.table = nnx.Param(jnp.zeros((num_heads, 2 * gr - 1, 2 * gc - 1)))

    def __call__(self) -> Float[Array, "1 N T T"]:
        gr, gc = self.grid
        r = jnp.repeat(jnp.arange(gr), gc)  # [P]
        c = jnp.tile(jnp.arange(gc), gr)  # [P]
        dr = r[:, None] - r[None, :] + gr - 1  # [P, P]
        dc = c[:, None] - c[None, :] + gc - 1
        bias = self.table[...][:, dr, dc]  # [N, P, P]
        k = self.prefix
        bias = jnp.pad(bias, ((0, 0), (k, 0), (k, 0)))
        return bias[None]


class VisionTransformer(nnx.Module):
    """ViT classifier (Dosovitskiy et al., 2021) on `[B, H, W, C]` images of a fixed size.

    Args:
      image_size: `(H, W)`. patch: patch side. channels: C. num_classes: outputs.
      d_model, num_heads, num_layers, d_ff, dropout_rate: the encoder's sizes.
      positional: 'sinusoidal' (2-D), 'learned', or 'relative' (a learned 2-D bias per head).
      pool: 'cls' (the class token's output) or 'mean' (of the patch outputs); the class token
        is there in both, so the token axis is always `1 + P`.
      attention: passed to every `MultiHeadAttention` (a name or a kernel callable).
      rngs: initialisation and dropout.
    """

    prefix = 1

    def __init__(
        self,
        image_size: tuple[int, int],
        patch: int,
        channels: int,
        num_classes: int,
        *,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        d_ff: int = 128,
        dropout_rate: float = 0.0,
        positional: str = "sinusoidal",
        pool: str = "cls",
        attention: str | Callable[..., Array] | None = None,
        rngs: nnx.Rngs,
    ):
        if positional not in VIT_POSITIONAL:
            raise ValueError(f"positional must be one of {VIT_POSITIONAL}, got {positional!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.patches = PatchEmbedding(patch, channels, d_model, rngs=rngs)
        self.grid = self.patches.grid(*image_size)
        self.image_size, self.positional, self.pool = tuple(image_size), positional, pool
        P = self.grid[0] * self.grid[1]
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d_model)) * 0.02)
        self.position_table = (
            nnx.Param(jax.random.normal(rngs.params(), (1, P, d_model)) * 0.02)
            if positional == "learned" else nnx.data(None)
        )  # fmt: skip
        self.relative_bias = (
            RelativeBias2D(num_heads, self.grid, self.prefix, rngs=rngs)
            if positional == "relative" else nnx.data(None)
        )  # fmt: skip
        self.layers = nnx.List([
            TransformerEncoderLayer(d_model, num_heads, d_ff, dropout_rate=dropout_rate,
                                    attention=attention, rngs=rngs)
            for _ in range(num_layers)
        ])  # fmt: skip
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(
        self, images: Float[ArrayLike, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B K"]:
        """Args: `images [B, H, W, C]` of size `image_size`. Returns logits `[B, K]`."""
        if tuple(jnp.shape(images)[1:3]) != self.image_size:
            raise ValueError(f"images must be {self.image_size}, got {jnp.shape(images)[1:3]}")
        x = self.patches(images)  # [B, P, D]
        B, _, D = x.shape
        if self.positional == "sinusoidal":
            x = x + sinusoidal_2d(*self.grid, D).astype(x.dtype)[None]
        elif self.position_table is not None:
            x = x + self.position_table[...]
        cls = jnp.broadcast_to(self.cls_token[...], (B, 1, D)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + P, D]
        bias = None if self.relative_bias is None else self.relative_bias()
        for layer in self.layers:
            x = layer(x, bias=bias, deterministic=deterministic)
        x = self.final_norm(x)
        pooled = x[:, 0] if self.pool == "cls" else x[:, self.prefix :].mean(axis=1)
        return self.head(pooled)


class _Recording:
    """Mixin: `record` is True only while `capture_image_attention` runs."""

    record: bool | None = None

    def _sow(self, kind: type[nnx.Intermediate], name: str, value: ArrayLike) -> None:
        if self.record:
            self.sow(kind, name, jnp.asarray(value, jnp.float32))


class SqueezeExcitation(_Recording, nnx.Module):
    """Channel attention (Hu et al., 2018): `x * sigmoid(MLP(mean_HW x))`.

    Args: channels: C. reduction: hidden width `max(1, C // reduction)`. rngs: initialisation.
    """

    def __init__(self, channels: int, reduction: int = 4, *, rngs: nnx.Rngs):
        hidden = max(1, channels // reduction)
        self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, rngs=rngs)

    def weights(self, x: Float[ArrayLike, "B H W C"]) -> Float[Array, "B C"]:
        """Channel weights `[B, C]` in (0, 1)."""
        s = jnp.mean(jnp.asarray(x), axis=(1, 2))
        return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))

    def __call__(self, x: Float[ArrayLike, "B H W C"]) -> Float[Array, "B H W C"]:
        """Args: `x [B, H, W, C]`. Returns `x` scaled per channel."""
        w = self.weights(x)
        self._sow(ChannelWeights, "channel", w)
        return jnp.asarray(x) * w[:, None, None, :]


class CBAM(_Recording, nnx.Module):
    """Convolutional block attention (Woo et al., 2018): channel attention from average- and
    max-pooled features through one MLP, then a spatial map from a `kernel x kernel`
    convolution over the channel-wise mean and max.

    Args: channels: C. reduction: MLP hidden width `max(1, C // reduction)`. kernel: the
    spatial convolution's size. rngs: initialisation.
    """

    def __init__(self, channels: int, reduction: int = 4, kernel: int = 7, *, rngs: nnx.Rngs):
        hidden = max(1, channels // reduction)
        self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, rngs=rngs)
        self.spatial = nnx.Conv(2, 1, (kernel, kernel), padding="SAME", rngs=rngs)

    def channel_weights(self, x: Float[ArrayLike, "B H W C"]) -> Float[Array, "B C"]:
        """Channel weights `[B, C]` in (0, 1)."""
        x = jnp.asarray(x)

        def mlp(s):
            return self.fc2(jax.nn.relu(self.fc1(s)))

        return jax.nn.sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))

    def spatial_map(self, x: Float[ArrayLike, "B H W C"]) -> Float[Array, "B H W"]:
        """Spatial weights `[B, H, W]` in (0, 1)."""
        x = jnp.asarray(x)
        pooled = jnp.stack([x.mean(axis=-1), x.max(axis=-1)], axis=-1)  # [B, H, W, 2]
        return jax.nn.sigmoid(self.spatial(pooled)[..., 0])

    def __call__(self, x: Float[ArrayLike, "B H W C"]) -> Float[Array, "B H W C"]:
        """Args: `x [B, H, W, C]`. Returns `x` reweighted per channel, then per position."""
        c = self.channel_weights(x)
        x = jnp.asarray(x) * c[:, None, None, :]
        s = self.spatial_map(x)
        self._sow(ChannelWeights, "channel", c)
        self._sow(SpatialMap, "spatial", s)
        return x * s[..., None]


class CNNClassifier(nnx.Module):
    """A small CNN with an attention block per stage, for `[B, H, W, C]` images.

    Each stage: two 3x3 convolutions (ReLU), the block (`'se'`, `'cbam'` or `'none'`), then 2x2
    average pooling before the next stage. Global average pooling and a linear head follow.

    Args:
      channels: C. num_classes: K. widths: channels per stage. block: the attention block.
      reduction: the blocks' MLP reduction. kernel: CBAM's spatial kernel. rngs: initialisation.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        widths: tuple[int, ...] = (32, 64),
        block: str = "se",
        reduction: int = 4,
        kernel: int = 7,
        rngs: nnx.Rngs,
    ):
        if block not in ("se", "cbam", "none"):
            raise ValueError(f"block must be 'se', 'cbam' or 'none', got {block!r}")
        if not widths:
            raise ValueError("widths must name at least one stage")
        self.channels = channels
        convs, blocks, c_in = [], [], channels
        for w in widths:
            convs.append(nnx.List([
                nnx.Conv(c_in, w, (3, 3), padding="SAME", rngs=rngs),
                nnx.Conv(w, w, (3, 3), padding="SAME", rngs=rngs),
            ]))  # fmt: skip
            if block == "se":
                blocks.append(SqueezeExcitation(w, reduction, rngs=rngs))
            elif block == "cbam":
                blocks.append(CBAM(w, reduction, kernel, rngs=rngs))
            else:
                blocks.append(nnx.data(None))
            c_in = w
        self.convs, self.blocks = nnx.List(convs), nnx.List(blocks)
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def __call__(
        self, images: Float[ArrayLike, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B K"]:
        """Args: `images [B, H, W, C]`. Returns logits `[B, K]` (`deterministic` is unused)."""
        _check_images(images, self.channels)
        x = jnp.asarray(images)
        for i, (convs, block) in enumerate(zip(self.convs, self.blocks, strict=True)):
            if i:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
            for conv in convs:
                x = jax.nn.relu(conv(x))
            if block is not None:
                x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def image_attention_blocks(model: nnx.Module) -> dict[str, SqueezeExcitation | CBAM]:
    """Every SE / CBAM block of `model`, keyed by its module path joined with '/'."""
    return {
        "/".join(str(p) for p in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, SqueezeExcitation | CBAM)
    }


def _flat(state: Any) -> Iterator[tuple[str, Any]]:
    for path, variable in nnx.to_flat_state(state):
        yield "/".join(str(p) for p in path[:-1]), variable.get_value()[-1]


def capture_image_attention(
    model: nnx.Module, *args: Any, **kwargs: Any
) -> tuple[Any, dict[str, dict[str, Array]]]:
    """Run `model(*args, **kwargs)` and return its output with its SE / CBAM weights.

    Returns:
      `(output, {"channel": {path: [B, C]}, "spatial": {path: [B, H, W]}})`, float32, where
      `path` is the block's module path (e.g. `'blocks/1'`). The output is the same as without
      capture (the blocks compute the same values; recording only stores them).
    """
    blocks = image_attention_blocks(model)
    with temporarily("record", ((b, True) for b in blocks.values())):
        output, channel, spatial = nnx.capture(model, ChannelWeights, SpatialMap)(
            *args, **kwargs
        )
    return output, {"channel": dict(_flat(channel)), "spatial": dict(_flat(spatial))}
