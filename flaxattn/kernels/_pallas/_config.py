"""Static configuration of a Pallas attention call: the tile math, block sizes, launch options."""

from __future__ import annotations

import dataclasses
from typing import Any

from flaxattn.kernels._pallas._tiles import TileMath


@dataclasses.dataclass(frozen=True)
class Blocks:
    """`(block_q, block_k)` tiles of each kernel.

    Attributes:
      fwd: forward kernel: query rows per program, keys per inner step.
      dq: dq kernel: query rows per program, keys per inner step.
      dkv: dk/dv kernel: `(block_q, block_k)` = queries per inner step, keys per program.
    """

    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one call (hashable: it is a `custom_vjp` non-diff argument).

    Attributes:
      math: the tile math (visibility structure, scale, modifiers, precision).
      backend: `'triton'` (GPU lowering conventions) or `'tpu'` (Mosaic TPU).
      interpret: run the kernels in Pallas interpret mode (CPU, for tests): a bool, or a
        `pltpu.InterpretParams` for the TPU simulator.
      blocks: tile sizes of the three kernels.
      groups: `G = N / K`, query heads per kv head.
      num_warps: Triton warps per program `(fwd, dq, dkv)`; ignored on TPU.
      num_stages: Triton software-pipelining stages `(fwd, dq, dkv)`; ignored on TPU.
    """

    math: TileMath
    backend: str
    interpret: Any
    blocks: Blocks
    groups: int
    num_warps: tuple[int, int, int] = (4, 4, 4)
    num_stages: tuple[int, int, int] = (2, 2, 2)
