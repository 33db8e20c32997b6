"""What bounds the blocked kernel on CPU: the throughput of its tile products under XLA.

    .venv/bin/python benchmarks/tile_products_cpu.py              # prints a table
    .venv/bin/python benchmarks/tile_products_cpu.py --repeats 3  # quicker

A flash-style forward spends most of its time in two batched products per block, `QKᵀ`
(`[N, bq, H] x [N, bk, H]`, contraction H = 64) and `PV` (`[N, bq, bk] x [N, bk, H]`). This
script times each product alone, as XLA:CPU compiles it, beside the same product in PyTorch
(`torch.bmm`, MKL/oneDNN) and beside the square float32 matmul that the benchmarks use as the
machine's ceiling, all called in alternation (`flaxattn.bench.time_interleaved`) so that
they share the machine's load. The ratio of the XLA tile product to the ceiling bounds what
any plain-JAX blocked kernel can reach before its softmax is counted.
"""

from __future__ import annotations

import argparse
import os

# PyTorch's OpenMP threads busy-wait after each call by default, stealing the cores from the
# XLA call that follows in an interleaved run; passive waiting keeps the peers independent.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.bench import compiled_call, square_matmul, time_interleaved

N, H = 8, 64
TILES = ((512, 256), (1024, 128), (1024, 256), (2048, 256))
MATMUL = 2048


def torch_bmm(a: np.ndarray, b: np.ndarray):
    """A zero-argument `torch.bmm(a, b)`, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return lambda: torch.bmm(ta, tb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    square = jnp.ones((MATMUL, MATMUL), jnp.float32)
    calls = {"matmul": compiled_call(square_matmul, square)[0]}
    flops = {"matmul": 2.0 * MATMUL**3}
    for bq, bk in TILES:
        q = rng.standard_normal((N, bq, H), np.float32)
        k_t = rng.standard_normal((N, H, bk), np.float32)  # torch wants [N, H, bk] for QKᵀ
        p = rng.standard_normal((N, bq, bk), np.float32)
        v = rng.standard_normal((N, bk, H), np.float32)
        k = np.ascontiguousarray(k_t.transpose(0, 2, 1))  # [N, bk, H], as the kernel holds it
        work = 2.0 * N * bq * bk * H
        qk = lambda q, k: jnp.einsum("nqh,nkh->nqk", q, k)
        pv = lambda p, v: jnp.einsum("nqk,nkh->nqh", p, v)
        tile = {
            (bq, bk, "QKᵀ", "xla"): compiled_call(qk, jnp.asarray(q), jnp.asarray(k))[0],
            (bq, bk, "PV", "xla"): compiled_call(pv, jnp.asarray(p), jnp.asarray(v))[0],
        }
        for name, (a, b) in (("QKᵀ", (q, k_t)), ("PV", (p, v))):
            torch_call = torch_bmm(a, b)
            if torch_call is not None:
                tile[bq, bk, name, "torch"] = torch_call
        calls.update(tile)
        flops.update(dict.fromkeys(tile, work))
    timings = time_interleaved(calls, repeats=args.repeats)
    rate = {key: flops[key] / timings[key].median for key in calls}
    ceiling = rate.pop("matmul")
    print(f"float32 {MATMUL}^3 matmul (XLA): {ceiling / 1e9:.0f} GFLOP/s "
          f"(median of {args.repeats} alternating rounds); N={N}, H={H}")
    print("| tile bq x bk | product | XLA GFLOP/s | XLA / matmul | torch GFLOP/s "
          "| torch / matmul |")
    print("|---|---|---|---|---|---|")
    for bq, bk in TILES:
        for name in ("QKᵀ", "PV"):
            xla = rate[bq, bk, name, "xla"]
            torch_rate = rate.get((bq, bk, name, "torch"))
            torch_cells = ("-", "-") if torch_rate is None else (
                f"{torch_rate / 1e9:.0f}", f"{torch_rate / ceiling:.2f}"
            )
            print(f"| {bq} x {bk} | {name} | {xla / 1e9:.0f} | {xla / ceiling:.2f} | "
                  f"{torch_cells[0]} | {torch_cells[1]} |")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")


if __name__ == "__main__":
    main()
