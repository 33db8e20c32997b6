"""`pallas_attention`: argument checks, block sizes, padding, and the custom VJP."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jaxtyping import ArrayLike, Float

from flaxattn.kernels._call import Call, Result
from flaxattn.kernels._pallas._config import Blocks, KernelConfig
from flaxattn.kernels._pallas._tiles import LOG2E, TileMath
from flaxattn.kernels._plan import BlockPlan, plan_blocks
from flaxattn.kernels._registry import ALL_FEATURES, Implementation, register
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import Limits, Visibility

BACKENDS = ("triton", "tpu")
# Triton's tl.dot needs every matmul dimension >= 16.
TRITON_MIN_BLOCK = 16
# Mosaic TPU tiles are (8, 128); our tiles put block_k and block_q on the lanes.
TPU_LANES = 128


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _default_blocks(backend: str, interpret: bool | Any, H: int) -> Blocks:
    if backend == "tpu":
        return Blocks(fwd=(256, 512), dq=(256, 256), dkv=(256, 256))
    if interpret:
        return Blocks(fwd=(64, 64), dq=(64, 64), dkv=(64, 64))
    # Triton on GPU: FlashAttention-2 tutorial shapes, smaller tiles for big heads (shared
    # memory). Never tuned on hardware here (no GPU was available).
    if H <= 128:
        return Blocks(fwd=(128, 64), dq=(128, 32), dkv=(32, 128))
    return Blocks(fwd=(64, 32), dq=(64, 32), dkv=(32, 64))


def _fit(block: tuple[int, int], T: int, S: int, minimum: int) -> tuple[int, int]:
    """Shrink a tile to the (power-of-two rounded) sequence lengths, keeping >= `minimum`."""
    bq, bk = block
    return (max(minimum, min(bq, _next_pow2(T))), max(minimum, min(bk, _next_pow2(S))))


def _choose_blocks(
    block_sizes, backend: str, interpret: bool | Any, T: int, S: int, H: int
) -> Blocks:
    if block_sizes is not None:  # a pair of positive ints (checked by `prepare`)
        if not interpret and backend == "triton" and not all(
            b >= TRITON_MIN_BLOCK and b == _next_pow2(b) for b in block_sizes
        ):
            raise ValueError(
                "block_sizes for the Triton kernels must be powers of two >= "
                f"{TRITON_MIN_BLOCK}, got {tuple(block_sizes)}."
            )
        if not interpret and backend == "tpu" and any(b % TPU_LANES for b in block_sizes):
            raise ValueError(
                f"block_sizes for the TPU kernels must be multiples of {TPU_LANES}, got "
                f"{tuple(block_sizes)}."
            )
        blocks = Blocks(*(tuple(block_sizes),) * 3)
    else:
        blocks = _default_blocks(backend, interpret, H)
    if backend == "tpu" and not interpret:
        minimum = TPU_LANES
    elif backend == "triton":
        minimum = TRITON_MIN_BLOCK if not interpret or block_sizes is None else 1
    else:
        minimum = 1
    return Blocks(*(_fit(b, T, S, minimum) for b in (blocks.fwd, blocks.dq, blocks.dkv)))


def _pad_axis(x: ArrayLike, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _kernels(backend: str):
    if backend == "tpu":
        from flaxattn.kernels._pallas import _tpu

        return _tpu
    from flaxattn.kernels._pallas import _triton

    return _triton


class Plans(NamedTuple):
    """The block plans of the three kernels' blocks (`Blocks`): the forward's and the dq
    kernel's key lists, the dk/dv kernel's query lists."""

    fwd: BlockPlan
    dq: BlockPlan
    dkv: BlockPlan


def _plans(cfg: KernelConfig, limits: Limits, T: int, S: int, shared: bool) -> Plans:
    """One `plan_blocks` per distinct block shape (a `mask_mod` may hide anything: no block
    is then full)."""
    made: dict[tuple[int, int], BlockPlan] = {}
    for blocks in (cfg.blocks.fwd, cfg.blocks.dq, cfg.blocks.dkv):
        if blocks not in made:
            made[blocks] = plan_blocks(
                cfg.math.visibility, limits, T, S, *blocks,
                masked=cfg.math.mask_mod is not None, shared=shared,
            )
    return Plans(made[cfg.blocks.fwd], made[cfg.blocks.dq], made[cfg.blocks.dkv])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, limits, plans, cfg: KernelConfig):
    return _kernels(cfg.backend).forward(q, k, v, limits, plans.fwd, cfg)


def _flash_fwd(q, k, v, limits, plans, cfg):
    out, lse = _kernels(cfg.backend).forward(q, k, v, limits, plans.fwd, cfg)
    return (out, lse), (q, k, v, limits, plans, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
    q, k, v, limits, plans, out, lse = residuals
    d_out, d_lse = cotangents
    # FlashAttention-2's D = rowsum(dO · O); a cotangent on the lse enters as
    # dS = P (dP - D + dlse), so it is folded into D.
    delta = jnp.einsum(
        "btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32)
    ) - d_lse.astype(jnp.float32)
    # Base-2 lse; +inf for empty rows so that exp2(s - lse2) is 0 there.
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    dq, dk, dv = _kernels(cfg.backend).backward(
        q, k, v, d_out.astype(q.dtype), lse2, delta, limits, (plans.dq, plans.dkv), cfg
    )
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return dq, dk, dv, none(limits), none(plans)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K Hv"],
    *,
    visibility: Visibility | None = None,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_sizes: tuple[int, int] | None = None,
    interpret: bool | Any | None = None,
    backend: str | None = None,
) -> tuple[Float[ArrayLike, "B T N Hv"], Float[ArrayLike, "B N T"]]:
    """Flash attention as Pallas kernels (forward, dq, dk/dv), differentiable by custom VJP.

    Args:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]`; `K` divides `N` (GQA/MQA: kv heads are indexed, never repeated).
      value: `[B, S, K, Hv]`.
      visibility: causal (either alignment), local window, per-example lengths.
      scale: logit multiplier; default `1 / sqrt(H)`.
      score_mod: `(score, q_idx, kv_idx) -> score`, traced into the kernels (no captured
        arrays); differentiated inside the backward kernels.
      mask_mod: `(q_idx, kv_idx) -> bool`, traced into the kernels (no captured arrays).
      block_sizes: `(block_q, block_k)` for all three kernels; default chosen per backend.
      interpret: Pallas interpret mode; `None` means True when `jax.default_backend()` is
        `'cpu'`. With `backend='tpu'` a `pltpu.InterpretParams()` selects the TPU simulator.
      backend: `'triton'` (GPU) or `'tpu'` (Mosaic TPU); `None` means `'tpu'` on TPU and
        `'triton'` elsewhere.

    Returns:
      `(output [B, T, N, Hv]` in the input dtype, `lse [B, N, T]` float32)`; a row with no
      visible key has output 0 and lse `-inf`.
    """
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    # (Compiling for CPU without interpret fails in Pallas itself, at lowering; lowering for
    # another platform from a CPU machine, as the tests do, works.)
    interpret = platform == "cpu" if interpret is None else interpret
    visibility = Visibility() if visibility is None else visibility
    B, T, N, H = query.shape
    S, K, Hv = key.shape[1], key.shape[2], value.shape[-1]
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    blocks = _choose_blocks(block_sizes, backend, interpret, T, S, H)
    high = jnp.dtype(query.dtype).itemsize >= 4
    tile_math = TileMath(
        visibility=dataclasses.replace(visibility, q_lengths=None, kv_lengths=None),
        scale=scale,
        score_mod=score_mod,
        mask_mod=mask_mod,
        precision=lax.Precision.HIGHEST if high else None,
    )
    cfg = KernelConfig(
        math=tile_math,
        backend=backend,
        interpret=interpret,
        blocks=blocks,
        groups=N // K,
        num_warps=(8 if max(H, Hv) > 64 else 4,) * 3,  # untuned guesses (no GPU was available)
        num_stages=(3, 2, 2),
    )
    # Pad sequences to every kernel's blocks and (Triton) head dims to powers of two >= 16;
    # padded keys lie past kv_len and padded queries past q_len, so masks hide them.
    Tp = _round_up(T, math.lcm(*(b[0] for b in (blocks.fwd, blocks.dq, blocks.dkv))))
    Sp = _round_up(S, math.lcm(*(b[1] for b in (blocks.fwd, blocks.dq, blocks.dkv))))
    head = (lambda d: max(TRITON_MIN_BLOCK, _next_pow2(d))) if backend == "triton" else None
    Hp, Hvp = (head(H), head(Hv)) if head else (H, Hv)
    q = _pad_axis(_pad_axis(query, 1, Tp), 3, Hp)
    k = _pad_axis(_pad_axis(key, 1, Sp), 3, Hp)
    v = _pad_axis(_pad_axis(value, 1, Sp), 3, Hvp)
    limits = visibility.limits(B, T, S)
    shared = visibility.q_lengths is None and visibility.kv_lengths is None
    out, lse = _flash(q, k, v, limits, _plans(cfg, limits, Tp, Sp, shared), cfg)
    return out[:, :T, :, :Hv], lse[:, :, :T]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def run(call: Call, *, interpret: bool | Any | None = None, backend: str | None = None) -> Result:
    """The registry's entry: the call through `pallas_attention`."""
    out, lse = pallas_attention(
        call.query, call.key, call.value, visibility=call.visibility, scale=call.scale,
        score_mod=call.score_mod, mask_mod=call.mask_mod, block_sizes=call.block_sizes,
        interpret=interpret, backend=backend,
    )
    return Result(out, lse)


register(
    Implementation(
        "pallas",
        run,
        "Pallas flash attention (Triton on GPU, Mosaic on TPU; interpret mode on CPU)",
        # The modifiers are traced into the kernels, so they may not capture arrays; a dense
        # [T, S] bias or mask would defeat the kernel.
        supports=ALL_FEATURES - {"bias", "mask", "mod_arrays", "dropout", "weights",
                                 "traced_scale"},
        dtypes=frozenset({"float16", "bfloat16", "float32"}),
        options=("interpret", "backend"),
        interpreted=lambda platform: platform == "cpu",
    )
)
