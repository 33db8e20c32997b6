"""A short tour of flaxattn's kernels: run them, compare them, print what they give.

Usage: python experiments/demo.py   (or `make demo`)
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import flaxattn
from flaxattn.kernels import (
    additive_attention,
    alibi_bias,
    attention_weights,
    cosine_score,
    prefix_lm_mask_mod,
    soft_cap_score_mod,
)


def _max_diff(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def main() -> None:
    device = jax.devices()[0]
    print(f"flaxattn {flaxattn.__version__} on {device.device_kind} ({jax.default_backend()})")
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    B, T, N, K, H = 2, 512, 8, 2, 64  # batch, length, query heads, kv heads (GQA), head dim
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, H))
    lengths = jnp.array([T, T // 2])

    print("\n1. Drop-in for jax.nn.dot_product_attention (max |difference|):")
    cases = {
        "plain": {},
        "causal": dict(is_causal=True),
        "window (64, 0)": dict(local_window_size=(64, 0)),
        "kv lengths": dict(key_value_seq_lengths=lengths),
        "alibi bias": dict(bias=alibi_bias(N, T)),
    }
    for name, kwargs in cases.items():
        ours = jax.jit(functools.partial(flaxattn.dot_product_attention, **kwargs))(q, k, v)
        ref = jax.jit(functools.partial(jax.nn.dot_product_attention, **kwargs))(q, k, v)
        print(f"   {name:15s} {_max_diff(ours, ref):.2e}")

    print("\n2. Implementations agree (max |difference| from 'reference'), causal + GQA:")
    ref = flaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    for impl in ("blocked", "xla"):
        try:
            fn = jax.jit(
                functools.partial(
                    flaxattn.dot_product_attention, is_causal=True, implementation=impl
                )
            )
            out = jax.block_until_ready(fn(q, k, v))
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            ms = (time.perf_counter() - start) * 1e3
            print(f"   {impl:9s} {_max_diff(out, ref):.2e}   ({ms:.1f} ms)")
        except (ImportError, ValueError) as err:  # e.g. an implementation this backend lacks
            print(f"   {impl:9s} unavailable: {err}")

    print("\n3. A query row with nothing to attend to gives 0 (jax.nn gives the mean of values):")
    mask = jnp.ones((1, 1, 4, 4), bool).at[..., 0, :].set(False)
    small = (q[:1, :4], k[:1, :4, :1].repeat(N, 2), v[:1, :4, :1].repeat(N, 2))
    ours = flaxattn.dot_product_attention(*small, mask=mask)
    theirs = jax.nn.dot_product_attention(*small, mask=mask)
    print(
        f"   flaxattn row 0: |out| = {float(jnp.abs(ours[0, 0]).max()):.3f}; "
        f"jax.nn row 0: |out| = {float(jnp.abs(theirs[0, 0]).max()):.3f}"
    )

    print("\n4. Other score functions, one head (weights of query 0 over 6 keys):")
    q1, k1 = q[0, :3, 0], k[0, :6, 0]
    for name, kwargs in {
        "scaled dot": {},
        "cosine, T=0.1": dict(score_fn=functools.partial(cosine_score, temperature=0.1)),
        "soft-capped": dict(score_mod=soft_cap_score_mod(1.0)),
        "prefix-LM(2)": dict(mask_mod=prefix_lm_mask_mod(2)),
    }.items():
        print(
            f"   {name:14s}",
            np.array2string(
                np.asarray(attention_weights(q1, k1, **kwargs)[0]), precision=2, suppress_small=True
            ),
        )
    A = 16
    params = [
        jax.random.normal(x, s) * 0.3
        for x, s in zip(jax.random.split(kd, 3), [(N, H, A), (N, H, A), (N, A)], strict=True)
    ]
    out, w = additive_attention(q[:, :5], k[:, :7], v[:, :7], *params, return_weights=True)
    print(f"   additive (Bahdanau), batched multi-head: output {out.shape}, weights {w.shape}")


if __name__ == "__main__":
    main()
