"""`'xla'` and `'cudnn'`: delegate to `jax.nn.dot_product_attention`, for comparison.

They keep jax.nn's convention for a query row with no visible key (the average of all values,
where flaxattn gives 0), and jax.nn's logsumexp residual carries no gradient: the registry
states both (`zero_empty_rows=False`, `residual_grad=False`).
"""

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


# jax.nn has no modifiers, weights, dropout, bottom-right alignment or value head dims of
# their own.
_SUPPORTS = frozenset(
    {"bias", "mask", "causal", "window", "lengths", "gqa", "residual", "traced_scale"}
)

register(
    Implementation(
        "xla", functools.partial(run, implementation="xla"),
        "jax.nn.dot_product_attention with XLA's implementation (materialises [T, S])",
        supports=_SUPPORTS, quadratic_memory=True, zero_empty_rows=False, residual_grad=False,
        # XLA:CPU has no float16 dot with float32 accumulation (F16_F16_F32).
        dtypes_on={"cpu": frozenset({"bfloat16", "float32", "float64"})},
    )
)
register(
    Implementation(
        "cudnn", functools.partial(run, implementation="cudnn"),
        "jax.nn.dot_product_attention with cuDNN's fused kernel (NVIDIA GPUs)",
        supports=_SUPPORTS, platforms=frozenset({"gpu"}), zero_empty_rows=False,
        residual_grad=False,
        dtypes=frozenset({"float16", "bfloat16"}),
    )
)
