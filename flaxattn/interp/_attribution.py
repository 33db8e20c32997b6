"""Direct logit attribution for `DecoderLM`: what each head writes straight into a logit.

A pre-LN decoder's last residual stream is a sum, `x = sum_c x_c` over its components (token
and position embeddings, each head's output through its slice of the output projection, the
projections' biases, the feed-forward blocks). The logit of token t is

    logit_t = LN(x) . u_t + b_t,   LN(x) = (x - mean(x)) / sigma(x) * gamma + beta,

with `u_t` the unembedding column of t. `sigma(x)` is the only non-linear part; freezing it at
its value in the clean run (as TransformerLens's direct logit attribution does) makes the logit
linear in the components:

    logit_t = sum_c (x_c - mean(x_c)) / sigma * gamma . u_t  +  beta . u_t + b_t.

A head's term is its *direct* effect only: what it changes through later layers (e.g. a
previous-token head that an induction head reads) is not in it, but in the later head's term.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, Int

from flaxattn.interp._hooks import head_layers, hooked
from flaxattn.nn import DecoderLM


def _unembedding(model: DecoderLM) -> tuple[Float[Array, "D V"], Float[Array, " V"]]:
    """`(W_U [D, V], b_U [V])` of the language head (the tied embedding has no bias)."""
    if model.head is None:
        W = model.decoder.embed.embedding.get_value()  # [V, D]
        return W.T, jnp.zeros(W.shape[0], W.dtype)
    head = model.head
    bias = head.bias.get_value() if head.bias is not None else jnp.zeros(head.out_features)
    return head.kernel.get_value(), bias


def direct_logit_attribution(
    model: DecoderLM,
    tokens: Int[Array, "B T"],
    targets: Int[Array, "B T"],
    *,
    lengths: Int[Array, " B"] | None = None,
) -> dict[str, Any]:
    """Each head's direct contribution to the logit of `targets`, final-norm scale frozen.

    Args:
      model: a pre-LN `DecoderLM` (post-LN has no final norm to freeze: a ValueError).
      tokens: `[B, T]` input tokens.
      targets: `[B, T]` the token whose logit is explained at each position.
      lengths: `[B]` valid lengths (passed to the model).

    Returns:
      `{'heads': [B, T, L, N], 'rest': [B, T], 'bias': [B, T], 'logit': [B, T],
      'layers': [path, ...]}`: `heads[..., l, n]` is head n of layer l's term; `rest` is every
      other component's (embeddings, projection biases, feed-forward blocks); `bias` is
      `beta . u_t + b_t`; `heads.sum((-2, -1)) + rest + bias == logit`, the model's logit.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model must be a DecoderLM, got {type(model).__name__}.")
    norm = model.decoder.final_norm
    if norm is None:
        raise ValueError("model: direct logit attribution needs a pre-LN DecoderLM "
                         "(config.pre_ln=True); a post-LN model has no final norm to freeze.")
    tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                         f"{targets.shape}.")
    layers = head_layers(model)
    outputs: dict[str, Array] = {}
    residual: list[Array] = []

    def keep(path):
        def hook(out, call):
            outputs[path] = out
            return out

        return hook

    def tap(x):
        residual.append(x)
        return norm(x)

    with hooked(model, {p: keep(p) for p in layers}):
        model.decoder.final_norm = tap
        try:
            logits = model(tokens, lengths=lengths)  # [B, T, V]
        finally:
            model.decoder.final_norm = norm
    x = residual[-1].astype(jnp.float32)  # [B, T, D]
    mean = x.mean(-1, keepdims=True)
    sigma = jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + norm.epsilon)  # [B, T, 1]
    gamma = norm.scale.get_value() if norm.scale is not None else jnp.ones(x.shape[-1])
    beta = norm.bias.get_value() if norm.bias is not None else jnp.zeros(x.shape[-1])
    W_U, b_U = _unembedding(model)
    u = jnp.take(W_U.T, targets, axis=0).astype(jnp.float32)  # [B, T, D]
    read = gamma[None, None, :] * u / sigma  # [B, T, D]: direct path of a centred component

    def direct(c: Array) -> Array:  # [B, T, ..., D] -> [B, T, ...]
        c = c - c.mean(-1, keepdims=True)
        return jnp.einsum("BT...D,BTD->BT...", c, read)

    per_head, written = [], jnp.zeros_like(x)
    for path, layer in layers.items():
        W_O = layer.out.kernel.get_value().astype(jnp.float32)  # [N, H, D]
        c = jnp.einsum("BTNH,NHD->BTND", outputs[path].astype(jnp.float32), W_O)
        per_head.append(direct(c))  # [B, T, N]
        written = written + c.sum(axis=2)
    logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return {
        "heads": jnp.stack(per_head, axis=2),  # [B, T, L, N]
        "rest": direct(x - written),
        "bias": jnp.einsum("BTD,D->BT", u, beta) + jnp.take(b_U, targets).astype(jnp.float32),
        "logit": logit.astype(jnp.float32),
        "layers": list(layers),
    }


def attribution_fn(model: DecoderLM):
    """`direct_logit_attribution` jitted for this model's structure: `fn(tokens, targets)`."""
    from flaxattn.interp._hooks import as_function

    rebuild, state = as_function(model)
    layers = list(head_layers(model))

    @jax.jit
    def run(state, tokens, targets):
        out = direct_logit_attribution(rebuild(state), tokens, targets)
        return {k: v for k, v in out.items() if k != "layers"}

    return lambda tokens, targets: {**run(state, tokens, targets), "layers": layers}
