"""`'xla'` and `'cudnn'`: delegate to `jax.nn.dot_product_attention`, for comparison."""

from __future__ import annotations

import functools

import jax

from flaxattn.kernels._call import Call, Result
from flaxattn.kernels._registry import Implementation, register


def run(call: Call, *, implementation: str) -> Result:
    """`jax.nn.dot_product_attention` with the call's arguments (it returns no weights)."""
    vis = call.visibility
    results = jax.nn.dot_product_attention(
        call.query, call.key, call.value, call.bias, call.mask, scale=call.scale,
        is_causal=vis.is_causal, query_seq_lengths=vis.q_lengths,
        key_value_seq_lengths=vis.kv_lengths, local_window_size=vis.window,
        implementation=implementation, return_residual=call.return_residual,
    )
    if not call.return_residual:
        return Result(results)
    out, lse = results  # lse [B, T, N]
    return Result(out, jax.numpy.swapaxes(lse, 1, 2))


# jax.nn has no modifiers, weights, dropout, bottom-right alignment or block sizes.
_SUPPORTS = frozenset(
    {"bias", "mask", "causal", "window", "lengths", "gqa", "value_head_dim", "residual",
     "traced_scale"}
)

register(
    Implementation(
        "xla", functools.partial(run, implementation="xla"),
        "jax.nn.dot_product_attention with XLA's implementation (materialises [T, S])",
        supports=_SUPPORTS, quadratic_memory=True,
    )
)
register(
    Implementation(
        "cudnn", functools.partial(run, implementation="cudnn"),
        "jax.nn.dot_product_attention with cuDNN's fused kernel (NVIDIA GPUs)",
        supports=_SUPPORTS - {"value_head_dim"}, platforms=frozenset({"gpu"}),
        dtypes=frozenset({"float16", "bfloat16"}),
    )
)
