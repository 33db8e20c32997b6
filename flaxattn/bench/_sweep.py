"""What a benchmark sweeps: a frozen `Sweep`, per-backend presets, and the points it expands to."""

from __future__ import annotations

import dataclasses
import itertools

PASSES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A benchmark sweep: the cross product of its tuples, run for every implementation.

    Attributes:
      seq_lens: query = key lengths `T = S` to run.
      head_dims: `H`.
      num_heads: `N`, query heads.
      gqa_ratios: `G = N / K`, query heads per kv head (1 = multi-head, N = multi-query).
      dtypes: input dtype names.
      causal: causal settings to run (False, True or both).
      passes: `'fwd'` and/or `'fwd+bwd'`.
      implementations: names in the registry (`flaxattn.bench.IMPLEMENTATIONS`).
      batch: `B`.
      repeats: timed calls per point after one warm-up (median, min, max reported).
      memory_budget_gb: skip implementations that materialise `[B, N, T, S]` when that
        estimate exceeds this many GiB (None: never skip).
      max_seconds: skip a point whose time, extrapolated as `T²` from the previous length,
        exceeds this many seconds per call (None: never skip).
      matmul_size: side of the square matmul that measures the device's peak, per dtype.
      error_rows: query rows compared with the float64 reference when the whole output is too
        big for it.
    """

    seq_lens: tuple[int, ...]
    head_dims: tuple[int, ...] = (64,)
    num_heads: tuple[int, ...] = (8,)
    gqa_ratios: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("float32",)
    causal: tuple[bool, ...] = (False, True)
    passes: tuple[str, ...] = PASSES
    implementations: tuple[str, ...] = (
        "reference", "blocked", "pallas", "xla", "cudnn", "flax_linen", "flax_nnx",
        "linear", "favor", "local", "block_sparse",
    )
    batch: int = 1
    repeats: int = 5
    memory_budget_gb: float | None = 4.0
    max_seconds: float | None = None
    matmul_size: int = 2048
    error_rows: int = 256


PRESETS: dict[str, Sweep] = {
    # CI and a first look: two short lengths, one repeat; Pallas runs interpreted on CPU.
    "tiny": Sweep(
        seq_lens=(64, 128), head_dims=(64,), num_heads=(4,), gqa_ratios=(2,), causal=(True,),
        repeats=1, matmul_size=512, memory_budget_gb=1.0,
    ),
    # The 2-core CPU: 512 to 16k. The whole preset takes hours; the README's run is reduced.
    "cpu": Sweep(
        seq_lens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128), gqa_ratios=(1, 4),
        dtypes=("float32", "bfloat16"), memory_budget_gb=4.0, max_seconds=30.0,
    ),
    "gpu": Sweep(
        seq_lens=(1024, 2048, 4096, 8192, 16384, 32768, 65536), head_dims=(64, 128),
        num_heads=(16,), gqa_ratios=(1, 4), dtypes=("bfloat16", "float32"), batch=1,
        repeats=10, memory_budget_gb=None, max_seconds=60.0, matmul_size=8192,
    ),
    "tpu": Sweep(
        seq_lens=(1024, 2048, 4096, 8192, 16384, 32768, 65536), head_dims=(128,),
        num_heads=(16,), gqa_ratios=(1, 4), dtypes=("bfloat16", "float32"), batch=1,
        repeats=10, memory_budget_gb=None, max_seconds=60.0, matmul_size=8192,
    ),
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One shape and dtype: every implementation and pass runs on the same inputs."""

    seq_len: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    causal: bool
    batch: int


def points(sweep: Sweep) -> list[Point]:
    """The sweep's points, lengths ascending within each setting (for the time budget)."""
    out = []
    for dtype, head_dim, heads, ratio, causal in itertools.product(
        sweep.dtypes, sweep.head_dims, sweep.num_heads, sweep.gqa_ratios, sweep.causal
    ):
        for seq_len in sorted(sweep.seq_lens):
            out.append(Point(seq_len, head_dim, heads, heads // ratio, dtype, causal, sweep.batch))
    return out


def check_sweep(sweep: Sweep, known_implementations) -> None:
    """Raise ValueError (one line, naming the field) for a sweep that cannot run."""
    for name in ("seq_lens", "head_dims", "num_heads", "gqa_ratios"):
        values = getattr(sweep, name)
        if not values or any(not isinstance(v, int) or v <= 0 for v in values):
            raise ValueError(f"{name} must be positive integers, got {values}")
    for heads, ratio in itertools.product(sweep.num_heads, sweep.gqa_ratios):
        if heads % ratio:
            raise ValueError(f"gqa ratio {ratio} does not divide num_heads {heads}")
    for name, values, choices in (
        ("dtypes", sweep.dtypes, DTYPES),
        ("passes", sweep.passes, PASSES),
        ("implementations", sweep.implementations, tuple(known_implementations)),
    ):
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise ValueError(f"{name}: unknown {bad or 'empty'}; choose from {', '.join(choices)}")
    if sweep.batch <= 0 or sweep.repeats <= 0 or sweep.matmul_size <= 0:
        raise ValueError("batch, repeats and matmul_size must be positive")
