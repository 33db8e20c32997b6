"""Transformer stacks: token embedding, positions, layers and the final LayerNorm.

`TransformerEncoder` and `TransformerDecoder` are built from a `TransformerConfig`; the
models compose them. Positions enter as the config says: added to the embeddings
('sinusoidal', 'learned'), rotated into q/k ('rope'), or as a logit bias ('alibi', 't5').
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.kernels import alibi_bias
from flaxattn.nn._blocks import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    dropout_layer,
)
from flaxattn.nn._checks import attention_choice, check_tokens
from flaxattn.nn._config import TransformerConfig
from flaxattn.nn._positional import (
    LearnedPositionalEmbedding,
    RoPE,
    T5RelativeBias,
    sinusoidal_encoding,
)


def _layer_kwargs(config: TransformerConfig, attention: str | Callable | None) -> dict[str, Any]:
    if attention is not None and config.implementation is not None:
        raise ValueError(
            f"attention={attention!r} and config.implementation={config.implementation!r} are "
            "two choices of the attention; give one."
        )
    return dict(
        num_kv_heads=config.num_kv_heads, dropout_rate=config.dropout_rate,
        attention_dropout_rate=config.attention_dropout_rate, pre_ln=config.pre_ln,
        rope=RoPE(base=config.rope_base) if config.positional == "rope" else None,
        attention=config.implementation if attention is None else attention,
        normalize_qk=config.normalize_qk, use_bias=config.use_bias,
        activation=config.activation,
    )


class _Stack(nnx.Module):
    """What encoder and decoder stacks share: embeddings, positions, dropout, final norm."""

    def __init__(self, config: TransformerConfig, vocab_size: int, *, causal: bool,
                 rngs: nnx.Rngs):
        D = config.d_model
        self.config = config
        self.causal = causal
        self.embed = nnx.Embed(vocab_size, D, rngs=rngs)
        self.positions = (
            LearnedPositionalEmbedding(config.max_len, D, rngs=rngs)
            if config.positional == "learned" else nnx.data(None)
        )
        self.relative_bias = (
            T5RelativeBias(
                config.num_heads, bidirectional=not causal, num_buckets=config.t5_num_buckets,
                max_distance=config.t5_max_distance, rngs=rngs,
            )
            if config.positional == "t5" else nnx.data(None)
        )
        self.dropout = dropout_layer(config.dropout_rate, rngs)
        self.final_norm = nnx.LayerNorm(D, rngs=rngs) if config.pre_ln else nnx.data(None)

    def _embed(
        self, tokens: Int[ArrayLike, "B T"], offset: int | Array, deterministic: bool
    ) -> Float[Array, "B T D"]:
        """Scaled token embeddings plus absolute positions `offset + [0, T)`."""
        check_tokens("tokens", tokens)
        T = tokens.shape[1]
        if self.positions is not None and self.config.max_len < T:
            raise ValueError(
                f"sequence length {T} exceeds max_len={self.config.max_len} of the learned "
                "position table."
            )
        x = self.embed(tokens) * math.sqrt(self.config.d_model)  # [B, T, D]
        positions = offset + jnp.arange(T)  # [T]
        if self.config.positional == "sinusoidal":
            x = x + sinusoidal_encoding(positions, self.config.d_model).astype(x.dtype)[None]
        elif self.positions is not None:
            x = x + self.positions(positions)[None]  # [1, T, D]
        return self.dropout(x, deterministic=deterministic)

    def _bias(self, T: int, S: int, offset: int | Array) -> Float[Array, "1 N T S"] | None:
        """The positional logit bias of the self-attention (ALiBi or T5), else None."""
        if self.config.positional == "alibi":
            return alibi_bias(self.config.num_heads, T, S, symmetric=not self.causal,
                              offset=offset)
        if self.relative_bias is not None:
            return self.relative_bias(T, S, offset=offset)
        return None

    def _finish(self, x: ArrayLike) -> Array:
        return x if self.final_norm is None else self.final_norm(x)


class TransformerEncoder(_Stack):
    """Token embedding, positions and `config.encoder_layers` bidirectional encoder layers.

    Args:
      config: sizes and choices.
      vocab_size: input vocabulary (default `config.source_vocab_size`).
      attention: passed to every `MultiHeadAttention` (a name, or a function such as ring
        attention; default `config.implementation`).
      attention_fn: deprecated spelling of `attention`.
      rngs: initialisation and dropout.
    """

    def __init__(self, config: TransformerConfig, *, vocab_size: int | None = None,
                 attention: str | Callable | None = None, attention_fn: Callable | None = None,
                 rngs: nnx.Rngs):
        vocab_size = config.source_vocab_size if vocab_size is None else vocab_size
        super().__init__(config, vocab_size, causal=False, rngs=rngs)
        attention = attention_choice("TransformerEncoder", attention, attention_fn)
        kwargs = _layer_kwargs(config, attention)
        self.layers = nnx.List([
            TransformerEncoderLayer(config.d_model, config.num_heads, config.d_ff, rngs=rngs,
                                    **kwargs)
            for _ in range(config.encoder_layers)
        ])

    def __call__(
        self, tokens: Int[ArrayLike, "B S"], *, lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "B S D"]:
        """Encode `tokens [B, S]` (valid up to `lengths [B]`) to `[B, S, D]`."""
        x = self._embed(tokens, 0, deterministic)
        S = tokens.shape[1]
        bias = self._bias(S, S, 0)
        for layer in self.layers:
            x = layer(x, lengths=lengths, bias=bias, deterministic=deterministic)
        return self._finish(x)


class TransformerDecoder(_Stack):
    """Token embedding, positions and `config.num_layers` causal decoder layers.

    Args:
      config: sizes and choices.
      cross_attention: layers attend to an encoder output (False for a decoder-only LM).
      attention: passed to every `MultiHeadAttention` (default `config.implementation`).
      attention_fn: deprecated spelling of `attention`.
      rngs: initialisation and dropout.
    """

    def __init__(self, config: TransformerConfig, *, cross_attention: bool,
                 attention: str | Callable | None = None, attention_fn: Callable | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, config.vocab_size, causal=True, rngs=rngs)
        attention = attention_choice("TransformerDecoder", attention, attention_fn)
        kwargs = _layer_kwargs(config, attention)
        self.layers = nnx.List([
            TransformerDecoderLayer(config.d_model, config.num_heads, config.d_ff,
                                    cross_attention=cross_attention, rngs=rngs, **kwargs)
            for _ in range(config.num_layers)
        ])

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> None:
        """An empty KV cache of `max_length` positions in every self-attention layer."""
        if self.positions is not None and max_length > self.config.max_len:
            raise ValueError(
                f"max_length ({max_length}) exceeds max_len={self.config.max_len} of the learned "
                "position table."
            )
        for layer in self.layers:
            layer.self_attention.init_cache(batch_size, max_length, dtype)

    def clear_cache(self) -> None:
        """Drop the KV caches."""
        for layer in self.layers:
            layer.self_attention.clear_cache()

    def __call__(
        self,
        tokens: Int[ArrayLike, "B T"],
        memory: Float[ArrayLike, "B S D"] | None = None,
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        memory_lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Float[Array, "B T D"]:
        """Decode `tokens [B, T]` to hidden states `[B, T, D]`.

        With `decode=True` the tokens continue the sequence in the KV cache: their positions
        start at the cache index, and they attend to everything cached.
        """
        T = tokens.shape[1]
        if decode:
            cache = self.layers[0].self_attention.get_cache()
            offset, S = cache.index, cache.max_length
        else:
            offset, S = 0, T
        x = self._embed(tokens, offset, deterministic)
        bias = self._bias(T, S, offset)
        for layer in self.layers:
            x = layer(x, memory, lengths=lengths, memory_lengths=memory_lengths, bias=bias,
                      deterministic=deterministic, decode=decode)
        return self._finish(x)
