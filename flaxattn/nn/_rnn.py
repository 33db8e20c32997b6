"""Recurrent models with attention: an attention-pooling classifier and Bahdanau seq2seq.

The recurrences are flax.nnx's GRU/LSTM cells; the attention is `AdditiveAttention`, which
calls the additive kernel. Shapes: B batch, T (target) length, S source length, E embedding,
Hd hidden size, V vocabulary, C classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Float, Int

from flaxattn.kernels._validate import check_choice
from flaxattn.nn._blocks import dropout_layer
from flaxattn.nn._checks import check_positive, check_tokens
from flaxattn.nn._decoding import run_on_copy
from flaxattn.nn._scored_attention import AdditiveAttention

CELLS = ("gru", "lstm")
Cell = str  # one of "gru", "lstm"


def _make_cell(cell: str, in_features: int, hidden: int, rngs: nnx.Rngs) -> nnx.RNNCellBase:
    check_choice("cell", cell, CELLS)
    make = nnx.GRUCell if cell == "gru" else nnx.LSTMCell
    return make(in_features, hidden, rngs=rngs)


def _carry(cell: str, h: Float[ArrayLike, "B Hd"]) -> Any:
    """The cell's carry with hidden state `h` (an LSTM's memory starts at zero)."""
    return h if cell == "gru" else (jnp.zeros_like(h), h)


def _hidden(cell: str, carry: Any) -> Float[Array, "B Hd"]:
    return carry if cell == "gru" else carry[1]


class RNNAttentionClassifier(nnx.Module):
    """Attention over RNN states for classification (Yang et al. 2016's attention pooling).

        h = RNN(embed(tokens))                     [B, T, Hd]
        pooled = Σ_t softmax_t(vᵀ tanh(W_q u + W_k h_t)) h_t     u: a learned query  [B, Hd]
        logits = W_o pooled                        [B, C]

    Padding past `lengths` is hidden from the attention. The pooling layer is `attention`
    (kind 'cross'); `capture_attention` returns its weights `[B, 1, 1, T]`.

    Args:
      vocab_size, embed_dim, hidden_dim, num_classes: V, E, Hd, C.
      cell: `'gru'` or `'lstm'` (flax.nnx cells).
      attention_dim: A of the additive score (default Hd).
      dropout_rate: dropout on the embeddings and the pooled vector.
      rngs: initialisation and dropout.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden_dim: int, num_classes: int, *,
        cell: Cell = "gru", attention_dim: int | None = None, dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                            ("hidden_dim", hidden_dim), ("num_classes", num_classes)):
            check_positive(name, value)
        A = hidden_dim if attention_dim is None else attention_dim
        self.cell = cell
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.rnn = nnx.RNN(_make_cell(cell, embed_dim, hidden_dim, rngs), rngs=False)
        self.query = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (A,)))
        self.attention = AdditiveAttention(A, hidden_dim, A, rngs=rngs)
        self.dropout = dropout_layer(dropout_rate, rngs)
        self.head = nnx.Linear(hidden_dim, num_classes, rngs=rngs)

    def __call__(
        self, tokens: Int[ArrayLike, "B T"], lengths: Int[ArrayLike, " B"] | None = None, *,
        deterministic: bool = True,
    ) -> Float[Array, "B C"]:
        """Class logits `[B, C]` of `tokens [B, T]`, valid up to `lengths [B]`."""
        check_tokens("tokens", tokens)
        B = tokens.shape[0]
        x = self.dropout(self.embed(tokens), deterministic=deterministic)  # [B, T, E]
        h0 = jnp.zeros((B, self.rnn.cell.hidden_features), x.dtype)
        states = self.rnn(x, initial_carry=_carry(self.cell, h0), seq_lengths=lengths)
        query = jnp.broadcast_to(self.query[...], (B, 1, self.query.shape[0]))  # [B, 1, A]
        pooled = self.attention(query, states, key_value_seq_lengths=lengths)[:, 0]  # [B, Hd]
        return self.head(self.dropout(pooled, deterministic=deterministic))


class BahdanauSeq2Seq(nnx.Module):
    """RNN encoder-decoder with additive attention (Bahdanau, Cho and Bengio 2015).

        encoder: bidirectional RNN over embed(src)        states H [B, S, 2Hd]
        s_0 = tanh(W_b ←h_1)                              (the backward state at position 0)
        c_t = Σ_s softmax_s(vᵀ tanh(W_q s_{t-1} + W_k H_s)) H_s        [B, 2Hd]
        s_t = cell(s_{t-1}, [embed(y_{t-1}); c_t]);   logits_t = W_o [s_t; c_t]

    The attention layer is `attention` (kind 'cross'); `capture_attention` returns its
    weights `[B, 1, T, S]`.

    Args:
      src_vocab_size, tgt_vocab_size, embed_dim, hidden_dim: sizes.
      cell: `'gru'` or `'lstm'`.
      attention_dim: A of the additive score (default Hd).
      rngs: initialisation.
    """

    def __init__(
        self, src_vocab_size: int, tgt_vocab_size: int, embed_dim: int, hidden_dim: int, *,
        cell: Cell = "gru", attention_dim: int | None = None, rngs: nnx.Rngs,
    ):
        for name, value in (("src_vocab_size", src_vocab_size), ("embed_dim", embed_dim),
                            ("tgt_vocab_size", tgt_vocab_size), ("hidden_dim", hidden_dim)):
            check_positive(name, value)
        E, Hd = embed_dim, hidden_dim
        self.cell = cell
        self.hidden_dim = Hd
        self.src_embed = nnx.Embed(src_vocab_size, E, rngs=rngs)
        self.tgt_embed = nnx.Embed(tgt_vocab_size, E, rngs=rngs)
        self.encoder = nnx.Bidirectional(
            nnx.RNN(_make_cell(cell, E, Hd, rngs), rngs=False),
            nnx.RNN(_make_cell(cell, E, Hd, rngs), rngs=False),
            rngs=False,
        )
        self.bridge = nnx.Linear(Hd, Hd, rngs=rngs)
        self.attention = AdditiveAttention(Hd, 2 * Hd, attention_dim, rngs=rngs)
        self.decoder_cell = _make_cell(cell, E + 2 * Hd, Hd, rngs)
        self.head = nnx.Linear(3 * Hd, tgt_vocab_size, rngs=rngs)

    def encode(
        self, src: Int[ArrayLike, "B S"], src_lengths: Int[ArrayLike, " B"] | None = None
    ) -> tuple[Float[ArrayLike, "B S D"], Any]:
        """Encoder states `[B, S, 2Hd]` and the decoder's initial carry."""
        check_tokens("src", src)
        x = self.src_embed(src)  # [B, S, E]
        zero = _carry(self.cell, jnp.zeros((src.shape[0], self.hidden_dim), x.dtype))
        states = self.encoder(x, initial_carry=(zero, zero), seq_lengths=src_lengths)
        s0 = jnp.tanh(self.bridge(states[:, 0, self.hidden_dim:]))  # [B, Hd]
        return states, _carry(self.cell, s0)

    def _step(self, carry, y_embedded, states, src_lengths, return_weights: bool):
        """One decoder step: `(carry, embed(y_{t-1}) [B, E]) -> (carry, logits [B, V], weights)`."""
        query = _hidden(self.cell, carry)[:, None]  # [B, 1, Hd]
        context, weights = self.attention.attend(
            query, states, key_value_seq_lengths=src_lengths, return_weights=return_weights
        )  # [B, 1, 2Hd]; weights [B, 1, 1, S]
        context = context[:, 0]
        carry, out = self.decoder_cell(carry, jnp.concatenate([y_embedded, context], axis=-1))
        return carry, self.head(jnp.concatenate([out, context], axis=-1)), weights

    def __call__(
        self, src: Int[ArrayLike, "B S"], src_lengths: Int[ArrayLike, " B"] | None,
        tgt_in: Int[ArrayLike, "B T"],
    ) -> Float[Array, "B T V"]:
        """Teacher-forced logits `[B, T, V]`; `tgt_in` is the target shifted right (BOS first)."""
        check_tokens("tgt_in", tgt_in)
        states, carry = self.encode(src, src_lengths)
        capture = self.attention.capture is not None

        def step(carry, y_embedded):
            carry, logits, weights = self._step(carry, y_embedded, states, src_lengths, capture)
            return carry, (logits, weights)

        inputs = jnp.swapaxes(self.tgt_embed(tgt_in), 0, 1)  # [T, B, E]
        _, (logits, weights) = jax.lax.scan(step, carry, inputs)  # [T, B, V], [T, B, 1, 1, S]
        if capture:
            self.attention.record_weights(jnp.moveaxis(weights[:, :, :, 0], 0, 2))  # [B,1,T,S]
        return jnp.swapaxes(logits, 0, 1)

    def greedy_decode(
        self, src: Int[ArrayLike, "B S"], src_lengths: Int[ArrayLike, " B"] | None = None, *,
        max_length: int, bos_id: int,
    ) -> Int[Array, "B L"]:
        """Greedy output tokens `[B, max_length]` (BOS not included), under jit."""
        check_tokens("src", src)
        check_positive("max_length", max_length)
        return run_on_copy(self, "_greedy_decode", src, src_lengths, max_length=max_length,
                           bos_id=int(bos_id))

    def _greedy_decode(self, src, src_lengths, *, max_length: int, bos_id: int) -> Array:
        states, carry = self.encode(src, src_lengths)

        def step(carry_and_token, _):
            carry, token = carry_and_token
            carry, logits, _ = self._step(carry, self.tgt_embed(token), states, src_lengths,
                                          False)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (carry, token), token

        bos = jnp.full((src.shape[0],), bos_id, jnp.int32)
        _, tokens = jax.lax.scan(step, (carry, bos), length=max_length)  # [L, B]
        return tokens.T
