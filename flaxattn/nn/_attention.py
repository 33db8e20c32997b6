"""`MultiHeadAttention`: projections, RoPE and a KV cache around `flaxattn.dot_product_attention`.

Glossary of shapes: B batch, T query length, S key length (L, the cache length, when
decoding), N query heads, K key/value heads (K divides N), H head dim, F features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike, Bool, Float, Int

from flaxattn._deprecated import warn_deprecated
from flaxattn.kernels import combine_masks, dot_product_attention, get_implementation
from flaxattn.kernels._validate import check_choice
from flaxattn.nn._cache import KVCache
from flaxattn.nn._capture import Capturable, capture_reference_weights
from flaxattn.nn._checks import check_positive
from flaxattn.nn._positional import RoPE, apply_rope

KINDS = ("self", "cross")
_LECUN_NORMAL = nnx.initializers.lecun_normal()


class MultiHeadAttention(Capturable, nnx.Module):
    """Multi-head attention (Vaswani et al. 2017) with GQA, RoPE and a KV cache.

    The module holds the q/k/v/out projections (`nnx.LinearGeneral`, the same parameter tree
    as `flax.nnx.MultiHeadAttention`) and calls `attention` for the attention itself.

        q = x_q W_q [B, T, N, H];  k, v = x_kv W_k, x_kv W_v [B, S, K, H]
        out = attention(q, k, v, bias, mask, ...) [B, T, N, H] · W_o -> [B, T, F_out]

    Args:
      num_heads: N.
      in_features: F of `inputs_q`.
      num_kv_heads: K (default N); must divide N. K < N is GQA, K = 1 is MQA.
      qkv_features: N · H (default `in_features`); must be divisible by N.
      out_features: F_out (default `in_features`).
      in_kv_features: F of `inputs_kv` (default `in_features`).
      use_bias: biases in the four projections.
      dropout_rate: dropout on the attention weights (when not deterministic).
      normalize_qk: LayerNorm (no bias) on each head of q and k (ViT-22B).
      rope: `RoPE` settings, or True for the defaults, to rotate q and k by position.
      attention: the one choice of attention: the name of a registered implementation
        (`'reference'`, `'blocked'`, `'pallas'`, ...: `flaxattn.dot_product_attention` with
        that `implementation`), any function with `dot_product_attention`'s signature (e.g.
        `flaxattn.ring_attention_fn(mesh)`; only the keywords in use are passed), or None for
        `dot_product_attention`'s own rule.
      implementation, attention_fn: deprecated spellings of `attention` (until 0.3).
      kind: `'self'` or `'cross'`, as recorded by `capture_attention`.
      dtype, param_dtype: computation and parameter dtypes of the projections.
      rngs: parameter initialisation, and the dropout stream when `dropout_rate > 0`.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        in_kv_features: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        normalize_qk: bool = False,
        rope: RoPE | bool | None = None,
        attention: str | Callable[..., Array] | None = None,
        implementation: str | None = None,
        attention_fn: Callable[..., Array] | None = None,
        kind: str = "self",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = _LECUN_NORMAL,
        rngs: nnx.Rngs,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive("num_heads", num_heads)
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) must be divisible by num_heads ({num_heads})."
            )
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}).")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        attention = _one_attention(attention, implementation, attention_fn)
        check_choice("kind", kind, KINDS)
        rope = RoPE() if rope is True else (None if rope is False else rope)
        if rope is not None and not isinstance(rope, RoPE):
            raise ValueError(f"rope must be a RoPE, True or None, got {rope!r}.")

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = qkv_features // num_heads
        self.in_features = in_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.out_features = in_features if out_features is None else out_features
        self.dropout_rate = dropout_rate
        self.rope = rope
        self.attention = attention
        self.kind = kind
        self.deterministic = False  # default when a call passes deterministic=None
        self.capture = None
        self.intervention = None  # a HeadIntervention while `head_interventions` is active

        def projection(in_f, out_f, **kw) -> nnx.LinearGeneral:
            return nnx.LinearGeneral(
                in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, rngs=rngs, **kw,
            )

        N, K, H = num_heads, num_kv_heads, self.head_dim
        self.query = projection(in_features, (N, H))
        self.key = projection(self.in_kv_features, (K, H))
        self.value = projection(self.in_kv_features, (K, H))
        self.out = projection((N, H), self.out_features, axis=(-2, -1))
        if normalize_qk:
            norm = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.query_ln = nnx.LayerNorm(H, **norm)
            self.key_ln = nnx.LayerNorm(H, **norm)
        else:
            self.query_ln = nnx.data(None)
            self.key_ln = nnx.data(None)
        self.rngs = rngs.dropout.fork() if dropout_rate > 0.0 else nnx.data(None)
        self.cache: nnx.Cache | None = nnx.data(None)

    # ----------------------------------------------------------------------------- cache
    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> None:
        """Create an empty `KVCache` of `max_length` positions for `decode=True` calls."""
        self.cache = nnx.Cache(
            KVCache.zeros(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype)
        )

    def clear_cache(self) -> None:
        """Drop the cache (e.g. before saving the parameters)."""
        self.cache = None

    def get_cache(self) -> KVCache:
        """The `KVCache`; a `ValueError` if `init_cache` was not called."""
        if self.cache is None:
            raise ValueError(
                "decode=True needs a KV cache: call init_cache(batch_size, max_length) first."
            )
        return self.cache.get_value()

    # ------------------------------------------------------------------------------ call
    def __call__(
        self,
        inputs_q: Float[ArrayLike, "B T F"],
        inputs_kv: Float[ArrayLike, "B S Fkv"] | None = None,
        *,
        mask: Bool[ArrayLike, "*#BN #T #L"] | None = None,
        bias: Float[ArrayLike, "*#BN #T #L"] | None = None,
        is_causal: bool = False,
        query_seq_lengths: Int[ArrayLike, " B"] | None = None,
        key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
        decode: bool = False,
        deterministic: bool | None = None,
        head_mask: Bool[ArrayLike, " N"] | Sequence[bool] | None = None,
        head_scale: Float[ArrayLike, " N"] | Sequence[float] | None = None,
    ) -> Float[Array, "B T F_out"]:
        """Attend from `inputs_q` to `inputs_kv` (self-attention when it is None).

        Args:
          inputs_q: `[B, T, F]`.
          inputs_kv: `[B, S, F_kv]`, or None for self-attention.
          mask: booleans broadcastable to `[B, N, T, S]`, True = attend (S = L in decode).
          bias: added to the logits, broadcastable to `[B, N, T, S]` (ALiBi, T5, ...).
          is_causal: hide later keys. With `decode` the chunk is aligned bottom-right: its
            query i sits at position `index + i` of the cache.
          query_seq_lengths: `[B]`; rows past it get output 0 (before the out projection).
          key_value_seq_lengths: `[B]`; keys past it are hidden (set by the cache in decode).
          decode: append this chunk's keys and values to the cache (`init_cache` first) and
            attend over everything cached; positions continue from the cache index.
          deterministic: no dropout; None = `self.deterministic`.
          head_mask: `[N]` booleans; False zeroes that head's output (ablation).
          head_scale: `[N]` multipliers of each head's output. (Inside a model, set both
            with `head_interventions`.)

        Returns:
          `[B, T, F_out]`.
        """
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        _check_features("inputs_q", inputs_q, self.in_features)
        _check_features("inputs_kv", inputs_kv, self.in_kv_features)
        query = self.query(inputs_q)  # [B, T, N, H]
        key = self.key(inputs_kv)  # [B, S, K, H]
        value = self.value(inputs_kv)  # [B, S, K, H]
        if self.query_ln is not None:
            query, key = self.query_ln(query), self.key_ln(key)
        visibility = dict(is_causal=is_causal, query_seq_lengths=query_seq_lengths,
                          key_value_seq_lengths=key_value_seq_lengths)
        offset = 0
        if decode:
            if not self_attention or key_value_seq_lengths is not None:
                raise ValueError("decode=True caches self-attention: pass neither inputs_kv nor "
                                 "key_value_seq_lengths (the cache sets them).")
            offset = self.get_cache().index
        if self.rope is not None:  # positions continue from the cache index
            query = apply_rope(query, offset + jnp.arange(query.shape[1]), self.rope)
            key = apply_rope(key, offset + jnp.arange(key.shape[1]), self.rope)
        if decode:
            key, value, mask, visibility = self._append_to_cache(key, value, mask, visibility)
        visibility = {k: v for k, v in visibility.items() if v is not None and v is not False}

        kwargs = dict(visibility)
        attention_fn = self.attention
        if attention_fn is None or isinstance(attention_fn, str):
            if attention_fn is not None:
                kwargs["implementation"] = attention_fn
            attention_fn = dot_product_attention
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.dropout_rate > 0.0 and not deterministic:
            kwargs.update(dropout_rate=self.dropout_rate, dropout_key=self.rngs())
        x = attention_fn(query, key, value, bias, mask, **kwargs)  # [B, T, N, H]

        if self.capture is not None:
            self.sow_captured(
                capture_reference_weights(self.capture, query, key, value, bias, mask, **visibility)
            )
        if self.intervention is not None:
            head_mask = self.intervention.mask if head_mask is None else head_mask
            head_scale = self.intervention.scale if head_scale is None else head_scale
        return self.out(_intervene(x, head_mask, head_scale))

    def _append_to_cache(self, key, value, mask, visibility):
        """Write this chunk's keys/values; return the whole cache `[B, L, K, H]` and how the
        chunk sees it: keys up to `index + T`, causal aligned bottom-right (query i is at
        position `index + i`)."""
        old = self.get_cache()
        cache = old.append(key, value)
        self.cache.set_value(cache)
        B, T = key.shape[:2]
        lengths = visibility["query_seq_lengths"]
        new = T if lengths is None else lengths
        visibility["key_value_seq_lengths"] = jnp.broadcast_to(old.index + new, (B,)).astype(
            jnp.int32
        )
        if visibility["is_causal"] and not _aligns_bottom_right(self.attention):
            # e.g. jax.nn (xla, cudnn): hide the later keys with a mask instead.
            later = jnp.arange(cache.max_length)[None, :] > old.index + jnp.arange(T)[:, None]
            mask = combine_masks(mask, ~later)  # [T, L] with the caller's mask
            visibility["is_causal"] = False
        elif visibility["is_causal"]:
            visibility["causal_alignment"] = "bottom_right"
        return cache.key, cache.value, mask, visibility


def _one_attention(
    attention: str | Callable | None, implementation: str | None, attention_fn: Callable | None
) -> str | Callable | None:
    """The module's one attention choice, from `attention` or its deprecated spellings."""
    given = {
        name: value
        for name, value in (("attention", attention), ("implementation", implementation),
                            ("attention_fn", attention_fn))
        if value is not None
    }
    if len(given) > 1:
        raise ValueError(
            f"pass one of attention, implementation and attention_fn, got {sorted(given)}."
        )
    for old in ("implementation", "attention_fn"):
        if old in given:
            warn_deprecated(f"MultiHeadAttention({old}=...)",
                            "attention=... (a name or a function)", stacklevel=4)
    choice = next(iter(given.values()), None)
    if isinstance(choice, str):
        get_implementation(choice)  # a ValueError listing the names for an unknown one
    elif choice is not None and not callable(choice):
        raise TypeError(
            f"attention must be an implementation name, a function or None, got {choice!r}."
        )
    return choice


def _aligns_bottom_right(attention: str | Callable | None) -> bool:
    """Whether `attention` takes `causal_alignment='bottom_right'` (asked of the registry for
    a name; a function is trusted to, as `dot_product_attention` and the ring do)."""
    if isinstance(attention, str):
        return "bottom_right" in get_implementation(attention).supports
    return True


def _check_features(name: str, x: ArrayLike, features: int) -> None:
    if x.ndim != 3 or x.shape[-1] != features:
        raise ValueError(
            f"{name} must have shape [B, length, {features}], got shape {tuple(x.shape)}."
        )


def _intervene(
    x: Float[ArrayLike, "B T N H"],
    head_mask: ArrayLike | Sequence[bool] | None,
    head_scale: ArrayLike | Sequence[float] | None,
) -> Float[Array, "B T N H"]:
    """Per-head ablation and scaling of the attention output, before the out projection."""
    N = x.shape[2]
    for name, given in (("head_mask", head_mask), ("head_scale", head_scale)):
        if given is not None and np.shape(given) != (N,):
            raise ValueError(f"{name} must have shape [N] = [{N}], got {np.shape(given)}.")
    if head_mask is not None:
        keep = jnp.asarray(head_mask, bool).reshape(1, 1, N, 1)
        x = jnp.where(keep, x, jnp.zeros((), x.dtype))
    if head_scale is not None:
        x = x * jnp.asarray(head_scale, x.dtype).reshape(1, 1, N, 1)
    return x
