"""Attention layers with learned score functions: additive (Bahdanau) and multiplicative
(Luong "general"). Each holds its score parameters and calls a kernel; no projections of the
values, so the output is a weighted sum of the given values per head.

Shapes: B batch, T queries, S keys, N heads, D query features, E key features, Ev value
features, A attention (energy) features.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Bool, Float, Int

from flaxattn.kernels import additive_attention, general_score, scored_attention
from flaxattn.kernels._validate import check_choice
from flaxattn.nn._attention import KINDS
from flaxattn.nn._capture import Capturable
from flaxattn.nn._checks import check_positive


class _ScoredAttention(Capturable, nnx.Module):
    """Shared call logic: heads share the keys and values (one kv head), each scores with its
    own parameters, and the per-head outputs are concatenated."""

    def __init__(self, num_heads: int, kind: str):
        check_positive("num_heads", num_heads)
        check_choice("kind", kind, KINDS)
        self.num_heads = num_heads
        self.kind = kind
        self.capture = None

    def _kernel(self, query: ArrayLike, key: ArrayLike, value: ArrayLike, **kwargs: Any):
        raise NotImplementedError

    def attend(
        self,
        query: Float[ArrayLike, "B T D"],
        keys: Float[ArrayLike, "B S E"],
        values: Float[ArrayLike, "B S Ev"] | None = None,
        *,
        mask: Bool[ArrayLike, "*#BN #T #L"] | None = None,
        query_seq_lengths: Int[ArrayLike, " B"] | None = None,
        key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
        return_weights: bool = False,
    ) -> tuple[Float[ArrayLike, "B T NEv"], Float[ArrayLike, "B N T S"] | None]:
        """Like `__call__`, but returns `(output, weights or None)` and sows nothing (for use
        inside `lax.scan`, where a model records the stacked weights afterwards)."""
        values = keys if values is None else values
        B, T, _ = query.shape
        q = jnp.broadcast_to(query[:, :, None], (B, T, self.num_heads, query.shape[-1]))
        # q [B, T, N, D]
        results = self._kernel(
            q, keys[:, :, None], values[:, :, None], mask=mask,  # k, v: [B, S, 1, E|Ev]
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            return_weights=return_weights,
        )
        out, weights = results if return_weights else (results, None)  # out [B, T, N, Ev]
        return out.reshape(B, T, -1), weights

    def __call__(
        self,
        query: Float[ArrayLike, "B T D"],
        keys: Float[ArrayLike, "B S E"],
        values: Float[ArrayLike, "B S Ev"] | None = None,
        *,
        mask: Bool[ArrayLike, "*#BN #T #L"] | None = None,
        query_seq_lengths: Int[ArrayLike, " B"] | None = None,
        key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
    ) -> Float[Array, "B T NEv"]:
        """Attend from `query [B, T, D]` to `keys [B, S, E]`, pooling `values [B, S, Ev]`
        (default: the keys). Masks and lengths as in `flaxattn.dot_product_attention`.

        Returns:
          `[B, T, N · Ev]`: the heads' weighted sums of the values, concatenated.
        """
        out, weights = self.attend(
            query, keys, values, mask=mask, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, return_weights=self.capture is not None,
        )
        if weights is not None:
            self.record_weights(weights)
        return out


class AdditiveAttention(_ScoredAttention):
    """Additive attention (Bahdanau et al. 2015): `score(q, k) = vᵀ tanh(W_q q + W_k k)`.

    Args:
      query_features: D. key_features: E.
      attention_features: A (default E).
      num_heads: N, each with its own `W_q [D, A]`, `W_k [E, A]`, `v [A]`.
      kind: `'self'` or `'cross'` (for `capture_attention`).
      rngs: initialisation.
    """

    def __init__(
        self, query_features: int, key_features: int, attention_features: int | None = None,
        *, num_heads: int = 1, kind: str = "cross", rngs: nnx.Rngs,
    ):
        super().__init__(num_heads, kind)
        A = key_features if attention_features is None else attention_features
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        N = num_heads
        self.query_weight = nnx.Param(init(rngs.params(), (N, query_features, A)))
        self.key_weight = nnx.Param(init(rngs.params(), (N, key_features, A)))
        self.energy_weight = nnx.Param(init(rngs.params(), (N, A, 1))[..., 0])  # [N, A]

    def _kernel(self, query, key, value, **kwargs):
        return additive_attention(
            query, key, value, self.query_weight[...], self.key_weight[...],
            self.energy_weight[...], **kwargs,
        )


class MultiplicativeAttention(_ScoredAttention):
    """Multiplicative ("general") attention (Luong et al. 2015): `score(q, k) = q W kᵀ`.

    Args:
      query_features: D. key_features: E.
      num_heads: N, each with its own `W [D, E]`.
      kind: `'self'` or `'cross'` (for `capture_attention`).
      rngs: initialisation.
    """

    def __init__(
        self, query_features: int, key_features: int, *, num_heads: int = 1,
        kind: str = "cross", rngs: nnx.Rngs,
    ):
        super().__init__(num_heads, kind)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.weight = nnx.Param(init(rngs.params(), (num_heads, query_features, key_features)))

    def _kernel(self, query, key, value, **kwargs):
        return scored_attention(
            query, key, value, score_fn=general_score, score_params=(self.weight[...],), **kwargs
        )
