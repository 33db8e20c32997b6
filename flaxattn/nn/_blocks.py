"""Transformer layers: self-attention (+ cross-attention) + feed-forward, pre-LN or post-LN.

    pre-LN:  x = x + Dropout(f(LayerNorm(x)))      (Xiong et al. 2020; stable without warm-up)
    post-LN: x = LayerNorm(x + Dropout(f(x)))      (Vaswani et al. 2017)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.nn._attention import MultiHeadAttention
from flaxattn.nn._positional import RoPE

_ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}


class FeedForward(nnx.Module):
    """Position-wise `Linear(D, d_ff) -> activation -> Dropout -> Linear(d_ff, D)`."""

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu", dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.up = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, rngs=rngs)
        self.dropout = dropout_layer(dropout_rate, rngs)

    def __call__(
        self, x: Float[ArrayLike, "B T D"], *, deterministic: bool
    ) -> Float[Array, "B T D"]:
        hidden = _ACTIVATIONS[self.activation](self.up(x))  # [B, T, d_ff]
        return self.down(self.dropout(hidden, deterministic=deterministic))


def dropout_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # No RNG stream (hence no RNG state to checkpoint) when there is nothing to drop.
    return nnx.Dropout(rate, rngs=rngs if rate > 0.0 else None)


class _Sublayer(nnx.Module):
    """The residual connection, LayerNorm and dropout around one sublayer."""

    def __init__(self, d_model: int, *, pre_ln: bool, dropout_rate: float, rngs: nnx.Rngs):
        self.pre_ln = pre_ln
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.dropout = dropout_layer(dropout_rate, rngs)

    def __call__(self, x: ArrayLike, fn: Callable[[Array], Array], *, deterministic: bool) -> Array:
        if self.pre_ln:
            return x + self.dropout(fn(self.norm(x)), deterministic=deterministic)
        return self.norm(x + self.dropout(fn(x), deterministic=deterministic))


class _TransformerLayer(nnx.Module):
    """Self-attention, optional cross-attention, and feed-forward, each in a residual sublayer.

    Args:
      d_model: D. num_heads: N. d_ff: hidden width of the feed-forward block.
      cross_attention: add cross-attention to an encoder output (decoder layers).
      num_kv_heads: K (default N).
      dropout_rate: on sublayer outputs and the feed-forward hidden layer.
      attention_dropout_rate: on the attention weights.
      pre_ln: pre-LN (True) or post-LN.
      rope: RoPE settings for the self-attention, or None.
      attention, normalize_qk, use_bias: passed to `MultiHeadAttention` (`implementation`
        and `attention_fn` are its deprecated spellings of `attention`).
      activation: `'gelu'` or `'relu'`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        cross_attention: bool,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        pre_ln: bool = True,
        rope: RoPE | None = None,
        attention: str | Callable[..., Array] | None = None,
        implementation: str | None = None,
        attention_fn: Callable[..., Array] | None = None,
        normalize_qk: bool = False,
        use_bias: bool = True,
        activation: str = "gelu",
        rngs: nnx.Rngs,
    ):
        attention = dict(
            num_kv_heads=num_kv_heads, dropout_rate=attention_dropout_rate,
            normalize_qk=normalize_qk, use_bias=use_bias, attention=attention,
            implementation=implementation, attention_fn=attention_fn, rngs=rngs,
        )
        sublayer = dict(pre_ln=pre_ln, dropout_rate=dropout_rate, rngs=rngs)
        self.self_attention = MultiHeadAttention(
            num_heads, d_model, rope=rope, kind="self", **attention
        )
        self.self_attention_sublayer = _Sublayer(d_model, **sublayer)
        if cross_attention:
            self.cross_attention = MultiHeadAttention(num_heads, d_model, kind="cross", **attention)
            self.cross_attention_sublayer = _Sublayer(d_model, **sublayer)
        else:
            self.cross_attention = nnx.data(None)
            self.cross_attention_sublayer = nnx.data(None)
        self.feed_forward = FeedForward(
            d_model, d_ff, activation=activation, dropout_rate=dropout_rate, rngs=rngs
        )
        self.feed_forward_sublayer = _Sublayer(d_model, **sublayer)

    def _self_attend(self, x: ArrayLike, *, lengths, deterministic, decode, **kwargs: Any) -> Array:
        lengths = {} if decode else dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        return self.self_attention_sublayer(
            x,
            lambda y: self.self_attention(
                y, decode=decode, deterministic=deterministic, **lengths, **kwargs
            ),
            deterministic=deterministic,
        )

    def _feed_forward(self, x: ArrayLike, deterministic: bool) -> Array:
        return self.feed_forward_sublayer(
            x, lambda y: self.feed_forward(y, deterministic=deterministic),
            deterministic=deterministic,
        )


class TransformerEncoderLayer(_TransformerLayer):
    """Self-attention and feed-forward (see `_TransformerLayer` for the arguments)."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(d_model, num_heads, d_ff, cross_attention=False, rngs=rngs, **kwargs)

    def __call__(
        self,
        x: Float[ArrayLike, "B T D"],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        bias: ArrayLike | None = None,
        mask: ArrayLike | None = None,
        is_causal: bool = False,
        deterministic: bool = True,
        decode: bool = False,
        head_mask: ArrayLike | Sequence[bool] | None = None,
        head_scale: ArrayLike | Sequence[float] | None = None,
    ) -> Float[Array, "B T D"]:
        """Args: `x [B, T, D]`; `lengths [B]` (padding); `bias`, `mask`, `is_causal`, `decode`,
        `head_mask`, `head_scale` as in `MultiHeadAttention`. Returns `[B, T, D]`."""
        x = self._self_attend(
            x, lengths=lengths, bias=bias, mask=mask, is_causal=is_causal,
            deterministic=deterministic, decode=decode, head_mask=head_mask,
            head_scale=head_scale,
        )
        return self._feed_forward(x, deterministic)


class TransformerDecoderLayer(_TransformerLayer):
    """Causal self-attention, cross-attention to the encoder output, and feed-forward.

    Takes `_TransformerLayer`'s arguments; `cross_attention=False` makes the layer of a
    decoder-only model.
    """

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, *, cross_attention: bool = True,
        rngs: nnx.Rngs, **kwargs,
    ):
        super().__init__(
            d_model, num_heads, d_ff, cross_attention=cross_attention, rngs=rngs, **kwargs
        )

    def __call__(
        self,
        x: Float[ArrayLike, "B T D"],
        memory: Float[ArrayLike, "B S D"] | None = None,
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        memory_lengths: Int[ArrayLike, " B"] | None = None,
        bias: ArrayLike | None = None,
        deterministic: bool = True,
        decode: bool = False,
        head_mask: ArrayLike | Sequence[bool] | None = None,
        head_scale: ArrayLike | Sequence[float] | None = None,
    ) -> Float[Array, "B T D"]:
        """Args: `x [B, T, D]`; `memory [B, S, D]` (the encoder output; required with cross-
        attention); `lengths [B]`, `memory_lengths [B]` (padding); `bias` for the self-attention
        (positions); `decode` uses the self-attention's KV cache; `head_mask`/`head_scale`
        act on the self-attention. Returns `[B, T, D]`."""
        x = self._self_attend(
            x, lengths=lengths, bias=bias, is_causal=True, deterministic=deterministic,
            decode=decode, head_mask=head_mask, head_scale=head_scale,
        )
        if self.cross_attention is not None:
            if memory is None:
                raise ValueError("memory (the encoder output) is required for cross-attention.")
            x = self.cross_attention_sublayer(
                x,
                lambda y: self.cross_attention(
                    y, memory, query_seq_lengths=None if decode else lengths,
                    key_value_seq_lengths=memory_lengths, deterministic=deterministic,
                ),
                deterministic=deterministic,
            )
        return self._feed_forward(x, deterministic)
