"""The implementations a benchmark can run: a registry that others extend with `register`.

Every entry is a function `(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], *, causal) ->
out [B, T, N, H]` plus when it can run. Adding one (an efficient variant, say) is one call:

    register(Implementation("linear", lambda q, k, v, *, causal: ..., "linear attention"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Where:
    """What an implementation may ask about the place it would run.

    Attributes:
      platform: `jax.default_backend()`: `'cpu'`, `'gpu'` or `'tpu'`.
      device_kind: e.g. `'cpu'`, `'NVIDIA H100 80GB HBM3'`, `'TPU v5 lite'`.
      allow_interpret: whether a Pallas kernel may run in interpret mode here (the `tiny`
        preset on CPU: a correctness check, not a timing).
      dtype: the point's dtype name.
      head_dim: the point's head dim.
    """

    platform: str
    device_kind: str
    allow_interpret: bool
    dtype: str
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One attention implementation as the benchmark sees it.

    Attributes:
      name: the name used on the command line and in the records.
      fn: `(q, k, v, *, causal) -> out`.
      description: one line for the README and `--help`.
      quadratic_memory: it materialises `[B, N, T, S]` logits or weights, so the memory
        budget applies to it.
      unavailable: `Where -> reason or None`: why it cannot run there (recorded as
        `'unsupported'`).
      interpreted: `Where -> bool`: it runs in Pallas interpret mode there (timings are of the
        interpreter; plots leave it out).
    """

    name: str
    fn: AttentionFn
    description: str
    quadratic_memory: bool = False
    unavailable: Callable[[Where], str | None] = lambda where: None
    interpreted: Callable[[Where], bool] = lambda where: False


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register(impl: Implementation, *, replace: bool = False) -> Implementation:
    """Add `impl` to the registry (a `ValueError` if the name is taken, unless `replace`)."""
    if impl.name in IMPLEMENTATIONS and not replace:
        raise ValueError(f"an implementation named {impl.name!r} is already registered")
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def _flaxattn(implementation: str) -> AttentionFn:
    def fn(q, k, v, *, causal):
        import flaxattn

        return flaxattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    return fn


def _jax_nn(implementation: str) -> AttentionFn:
    return lambda q, k, v, *, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=implementation
    )


def _flax_linen(q, k, v, *, causal):
    import flax.linen as nn

    groups = q.shape[2] // k.shape[2]  # linen wants one kv head per query head
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    return nn.dot_product_attention(q, k, v, mask=mask)


def _flax_nnx(q, k, v, *, causal):
    from flax import nnx

    return nnx.dot_product_attention(q, k, v, is_causal=causal)


def _pallas_unavailable(where: Where) -> str | None:
    if where.platform == "cpu" and not where.allow_interpret:
        return "Pallas runs on CPU only in interpret mode (a correctness check): --preset tiny"
    return None


def _cudnn_unavailable(where: Where) -> str | None:
    if where.platform != "gpu" or "nvidia" not in where.device_kind.lower():
        return "cuDNN attention needs an NVIDIA GPU"
    if where.dtype not in ("bfloat16", "float16"):
        return f"cuDNN attention takes bfloat16 or float16, not {where.dtype}"
    return None


for _impl in (
    Implementation(
        "reference", _flaxattn("reference"),
        "flaxattn's single-head kernel vmapped over heads (materialises [T, S])",
        quadratic_memory=True,
    ),
    Implementation(
        "blocked", _flaxattn("blocked"),
        "flaxattn's flash-style plain-JAX kernel: online softmax, skipped blocks, custom VJP",
    ),
    Implementation(
        "pallas", _flaxattn("pallas"),
        "flaxattn's Pallas flash attention (Triton on GPU, Mosaic on TPU; interpreted on CPU)",
        unavailable=_pallas_unavailable,
        interpreted=lambda where: where.platform == "cpu",
    ),
    Implementation(
        "xla", _jax_nn("xla"), "jax.nn.dot_product_attention(implementation='xla')",
        quadratic_memory=True,
    ),
    Implementation(
        "cudnn", _jax_nn("cudnn"), "jax.nn.dot_product_attention(implementation='cudnn')",
        unavailable=_cudnn_unavailable,
    ),
    Implementation(
        "flax_linen", _flax_linen,
        "flax.linen.dot_product_attention (kv heads repeated for GQA, dense causal mask)",
        quadratic_memory=True,
    ),
    Implementation(
        "flax_nnx", _flax_nnx,
        "flax.nnx.dot_product_attention (delegates to jax.nn with implementation=None)",
        quadratic_memory=True,
    ),
):
    register(_impl)
