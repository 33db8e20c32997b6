"""Time and compiled memory against T for exact, blocked and the efficient variants (CPU).

    .venv/bin/python benchmarks/efficient_cpu.py            # writes benchmarks/results/
    .venv/bin/python benchmarks/efficient_cpu.py --quick    # T up to 2048, for a smoke run

Causal self-attention forward, float32, B=1, N=8, H=64, median of repeats after warm-up
(`flaxattn.bench`). Memory is XLA's compiled temporary bytes. Also reports each
variant's distance from exact softmax attention, and FAVOR+'s error against the number of
random features. Absolute times on a shared machine are noisy: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn import dot_product_attention
from flaxattn.bench import compiled_temp_bytes, time_jitted
from flaxattn.kernels.efficient import (
    block_sparse_attention,
    favor_attention,
    favor_projection,
    linear_attention,
    local_attention,
)

B, N, H = 1, 8, 64
WINDOW = 256  # local attention: (WINDOW, 0) under causal
FEATURES = 256  # FAVOR+
BLOCK = 64  # block-sparse: global 1, window 1 and random 1 blocks of 64
FAVOR_SETTINGS = ((1.0, True), (1.0, False), (0.5, True), (0.5, False))  # (σ, orthogonal)
FAVOR_COLUMNS = [f"σ={s} {'orth' if o else 'iid'}" for s, o in FAVOR_SETTINGS]


def variants(projection):
    """name -> (fn(q, k, v), largest T to run)."""
    return {
        "exact (reference)": (
            lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=True, implementation="reference"
            ),
            8192,
        ),
        "blocked": (
            lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=True, implementation="blocked"
            ),
            16384,
        ),
        "linear": (lambda q, k, v: linear_attention(q, k, v, is_causal=True), 16384),
        f"favor+ M={FEATURES}": (
            lambda q, k, v: favor_attention(q, k, v, is_causal=True, projection=projection),
            16384,
        ),
        f"local w={WINDOW}": (  # method='blocked' on CPU
            lambda q, k, v: local_attention(q, k, v, is_causal=True, local_window_size=(WINDOW, 0)),
            16384,
        ),
        f"blocked w={WINDOW}": (  # the same window through the blocked kernel's block skipping
            lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(WINDOW, 0), implementation="blocked"
            ),
            16384,
        ),
        f"block-sparse b={BLOCK}": (
            lambda q, k, v: block_sparse_attention(q, k, v, is_causal=True, block_size=BLOCK),
            16384,
        ),
    }


def inputs(T: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (B, T, N, H), jnp.float32) for k in ks)


def relative_error(out, exact) -> float:
    return float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 2048 only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    projection = favor_projection(jax.random.key(1), FEATURES, H)
    lines = [
        f"# Efficient attention variants on CPU: causal forward, float32, B={B}, N={N}, H={H}",
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, backend {jax.default_backend()}; load average (1 min) "
        f"{os.getloadavg()[0]:.1f} at the start. Machines are shared: compare ratios within "
        "the run.",
        f"# command: python benchmarks/efficient_cpu.py{' --quick' if args.quick else ''}",
        "",
        f"{'variant':<22}{'T':>7}{'median ms':>12}{'temp MiB':>11}{'rel. err vs exact':>19}",
    ]
    print("\n".join(lines), flush=True)
    results: dict[str, list[tuple[int, float, float]]] = {}
    for name, (fn, max_len) in variants(projection).items():
        for T in lengths:
            if max_len < T:
                continue
            q, k, v = inputs(T)
            timing = time_jitted(fn, q, k, v, repeats=3)
            temp = compiled_temp_bytes(fn, q, k, v) or 0
            err = ""
            if T <= 2048:  # distance from exact causal softmax attention
                exact = dot_product_attention(q, k, v, is_causal=True, implementation="blocked")
                err = f"{relative_error(jax.jit(fn)(q, k, v), exact):.2e}"
            results.setdefault(name, []).append((T, timing.median, temp / 2**20))
            line = f"{name:<22}{T:>7}{timing.median * 1e3:>12.1f}{temp / 2**20:>11.1f}{err:>19}"
            lines.append(line)
            print(line, flush=True)

    lines += [
        "",
        "# FAVOR+ error against exact causal softmax vs number of random features M: relative",
        "# L2 error of the output, mean ± std over 5 projections, T=1024. q, k ~ N(0, σ²):",
        "# the estimator's variance grows like exp(|q + k|² · scale), so σ matters a lot.",
        f"{'M':>6}" + "".join(f"{c:>18}" for c in FAVOR_COLUMNS),
    ]
    print("\n".join(lines[-5:]), flush=True)
    favor = jax.jit(functools.partial(favor_attention, is_causal=True))
    favor_errors = {}
    for M in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        row = []
        for sigma, orthogonal in FAVOR_SETTINGS:
            q, k, v = inputs(1024, seed=2)
            q, k = q * sigma, k * sigma
            exact = dot_product_attention(q, k, v, is_causal=True, implementation="blocked")
            errs = [
                relative_error(
                    favor(
                        q,
                        k,
                        v,
                        projection=favor_projection(jax.random.key(s), M, H, orthogonal=orthogonal),
                    ),
                    exact,
                )
                for s in range(5)
            ]
            row.append((np.mean(errs), np.std(errs)))
        favor_errors[M] = row
        line = f"{M:>6}" + "".join(f"{m:>10.4f} ±{s:.4f}" for m, s in row)
        lines.append(line)
        print(line, flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "efficient_cpu.txt").write_text("\n".join(lines) + "\n")
    plot(results, favor_errors, out_dir / "efficient_cpu.png")


def plot(results, favor_errors, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, rows in results.items():
        T, ms, mib = (np.array(x) for x in zip(*rows, strict=True))
        axes[0].loglog(T, ms * 1e3, "o-", label=name)
        axes[1].loglog(T, np.maximum(mib, 1e-3), "o-", label=name)
    for ax, title in ((axes[0], "time (ms, median)"), (axes[1], "compiled temp memory (MiB)")):
        ax.set_xlabel("sequence length T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    M = np.array(list(favor_errors))
    for j, label in enumerate(FAVOR_COLUMNS):
        mean = np.array([favor_errors[m][j][0] for m in M])
        std = np.array([favor_errors[m][j][1] for m in M])
        axes[2].errorbar(M, mean, yerr=std, fmt="o-", label=label, capsize=3)
    ref = favor_errors[M[0]][2][0]
    axes[2].loglog(M, ref * np.sqrt(M[0] / M), "k--", label="∝ 1/√M")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("random features M")
    axes[2].set_title("FAVOR+ relative error vs exact (T=1024)")
    axes[2].legend(fontsize=8)
    axes[2].grid(True, which="both", alpha=0.3)
    fig.suptitle(f"causal forward, CPU float32, B={B} N={N} H={H} (shared machine: noisy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
