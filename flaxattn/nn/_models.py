"""Transformer models: encoder-decoder, decoder-only LM, and encoder classifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.nn._blocks import dropout_layer
from flaxattn.nn._checks import attention_choice, check_positive, check_tokens
from flaxattn.nn._config import TransformerConfig
from flaxattn.nn._decoding import run_on_copy, sample, scan_decode
from flaxattn.nn._stacks import TransformerDecoder, TransformerEncoder


class _LanguageHead:
    """Logits from decoder states: a Linear layer, or the tied token embedding."""

    config: TransformerConfig
    decoder: TransformerDecoder

    def _init_head(self, rngs: nnx.Rngs) -> None:
        config = self.config
        self.head = (
            nnx.data(None) if config.tie_embeddings
            else nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)
        )

    def _logits(self, x: Float[ArrayLike, "B T D"]) -> Float[Array, "B T V"]:
        return self.decoder.embed.attend(x) if self.head is None else self.head(x)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> None:
        """An empty KV cache of `max_length` positions in every decoder self-attention."""
        self.decoder.init_cache(batch_size, max_length, dtype)

    def clear_cache(self) -> None:
        """Drop the KV caches."""
        self.decoder.clear_cache()


class EncoderDecoderTransformer(_LanguageHead, nnx.Module):
    """The Transformer of Vaswani et al. (2017) for sequence-to-sequence tasks.

    Attention layers: `encoder/layers/{i}/self_attention` and
    `decoder/layers/{i}/{self_attention, cross_attention}`.
    """

    def __init__(self, config: TransformerConfig, *, attention: str | Callable | None = None,
                 attention_fn: Callable | None = None, rngs: nnx.Rngs):
        self.config = config
        attention = attention_choice("EncoderDecoderTransformer", attention, attention_fn)
        self.encoder = TransformerEncoder(config, attention=attention, rngs=rngs)
        self.decoder = TransformerDecoder(config, cross_attention=True, attention=attention,
                                          rngs=rngs)
        self._init_head(rngs)

    def encode(
        self, src: Int[ArrayLike, "B S"], *, src_lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "B S D"]:
        """The encoder output ("memory") `[B, S, D]`."""
        return self.encoder(src, lengths=src_lengths, deterministic=deterministic)

    def decode(
        self,
        tgt_in: Int[ArrayLike, "B T"],
        memory: Float[ArrayLike, "B S D"],
        *,
        src_lengths: Int[ArrayLike, " B"] | None = None,
        tgt_lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Float[Array, "B T V"]:
        """Logits `[B, T, V]` of the next target tokens; `decode=True` continues the KV cache."""
        check_tokens("tgt_in", tgt_in)
        x = self.decoder(tgt_in, memory, lengths=tgt_lengths, memory_lengths=src_lengths,
                         deterministic=deterministic, decode=decode)
        return self._logits(x)

    def __call__(
        self,
        src: Int[ArrayLike, "B S"],
        tgt_in: Int[ArrayLike, "B T"],
        *,
        src_lengths: Int[ArrayLike, " B"] | None = None,
        tgt_lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "B T V"]:
        """Teacher-forced logits `[B, T, V]`: `tgt_in` is the target shifted right (BOS first)."""
        memory = self.encode(src, src_lengths=src_lengths, deterministic=deterministic)
        return self.decode(tgt_in, memory, src_lengths=src_lengths, tgt_lengths=tgt_lengths,
                           deterministic=deterministic)

    def greedy_decode(
        self, src: Int[ArrayLike, "B S"], src_lengths: Int[ArrayLike, " B"] | None = None, *,
        max_length: int, bos_id: int,
    ) -> Int[Array, "B L"]:
        """Greedy output tokens `[B, max_length]` (BOS not included), with the KV cache under
        jit. The model is not modified."""
        check_tokens("src", src)
        check_positive("max_length", max_length)
        return run_on_copy(self, "_greedy_decode", src, src_lengths, max_length=max_length,
                           bos_id=int(bos_id))

    def _greedy_decode(self, src, src_lengths, *, max_length: int, bos_id: int) -> Array:
        memory = self.encode(src, src_lengths=src_lengths)
        self.init_cache(src.shape[0], max_length)

        def step(model, token, _):
            logits = model.decode(token[:, None], memory, src_lengths=src_lengths, decode=True)
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return token, token

        bos = jnp.full((src.shape[0],), bos_id, jnp.int32)
        _, tokens = scan_decode(self, step, bos, length=max_length)  # [L, B]
        return tokens.T


class DecoderLM(_LanguageHead, nnx.Module):
    """A decoder-only (GPT-style) causal language model.

    Attention layers: `decoder/layers/{i}/self_attention`.
    """

    def __init__(self, config: TransformerConfig, *, attention: str | Callable | None = None,
                 attention_fn: Callable | None = None, rngs: nnx.Rngs):
        self.config = config
        attention = attention_choice("DecoderLM", attention, attention_fn)
        self.decoder = TransformerDecoder(config, cross_attention=False, attention=attention,
                                          rngs=rngs)
        self._init_head(rngs)

    def __call__(
        self,
        tokens: Int[ArrayLike, "B T"],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Float[Array, "B T V"]:
        """Next-token logits `[B, T, V]`; `decode=True` continues the KV cache."""
        x = self.decoder(tokens, lengths=lengths, deterministic=deterministic, decode=decode)
        return self._logits(x)

    def generate(
        self,
        prompt: Int[ArrayLike, "B P"],
        max_new_tokens: int,
        *,
        rng: ArrayLike,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
    ) -> Int[Array, "B L"]:
        """Continue `prompt` by `max_new_tokens` tokens with the KV cache, under jit.

        The prompt is fed as one chunk, then one token per step. Sampling is from
        `softmax(logits / temperature)` restricted to the `top_k` most likely tokens, or
        argmax with `greedy=True`. The model is not modified.

        Returns:
          `[B, P + max_new_tokens]` int32: the prompt, then the new tokens.
        """
        check_tokens("prompt", prompt)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}.")
        if not greedy and not temperature > 0.0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}.")
        if top_k is not None and not 0 < top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.config.vocab_size}], got {top_k}.")
        prompt = prompt.astype(jnp.int32)
        if max_new_tokens == 0:
            return prompt
        return run_on_copy(self, "_generate", prompt, rng, jnp.float32(temperature),
                           max_new_tokens=max_new_tokens, top_k=top_k, greedy=bool(greedy))

    def _generate(self, prompt, rng, temperature, *, max_new_tokens, top_k, greedy) -> Array:
        choose = lambda logits, key: sample(logits, key, temperature, top_k=top_k, greedy=greedy)
        keys = jax.random.split(rng, max_new_tokens)
        # The last new token is never fed back, so the cache needs one slot less.
        self.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens - 1)
        first = choose(self(prompt, decode=True)[:, -1], keys[0])  # [B]

        def step(model, token, key):
            token = choose(model(token[:, None], decode=True)[:, -1], key)
            return token, token

        _, rest = scan_decode(self, step, first, keys[1:])  # [M - 1, B]
        return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


class TransformerClassifier(nnx.Module):
    """A Transformer encoder, mean-pooled over the valid tokens, then a linear classifier.

    Attention layers: `encoder/layers/{i}/self_attention`.
    """

    def __init__(self, config: TransformerConfig, num_classes: int, *,
                 attention: str | Callable | None = None, attention_fn: Callable | None = None,
                 rngs: nnx.Rngs):
        check_positive("num_classes", num_classes)
        self.config = config
        attention = attention_choice("TransformerClassifier", attention, attention_fn)
        self.encoder = TransformerEncoder(config, vocab_size=config.vocab_size,
                                          attention=attention, rngs=rngs)
        self.dropout = dropout_layer(config.dropout_rate, rngs)
        self.head = nnx.Linear(config.d_model, num_classes, rngs=rngs)

    def __call__(
        self, tokens: Int[ArrayLike, "B T"], lengths: Int[ArrayLike, " B"] | None = None, *,
        deterministic: bool = True,
    ) -> Float[Array, "B C"]:
        """Class logits `[B, C]` of `tokens [B, T]`, valid up to `lengths [B]`."""
        x = self.encoder(tokens, lengths=lengths, deterministic=deterministic)  # [B, T, D]
        pooled = masked_mean(x, lengths)  # [B, D]
        return self.head(self.dropout(pooled, deterministic=deterministic))


def masked_mean(
    x: Float[ArrayLike, "B T D"], lengths: Int[ArrayLike, " B"] | None
) -> Float[Array, "B D"]:
    """Mean over the first `lengths[b]` positions of each example (all when None)."""
    if lengths is None:
        return x.mean(axis=1)
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
    total = jnp.sum(jnp.where(valid[..., None], x, 0.0), axis=1)
    return total / jnp.maximum(lengths, 1)[:, None].astype(x.dtype)
