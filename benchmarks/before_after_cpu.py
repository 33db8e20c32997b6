"""A change's effect on the kernels' speed: this tree against an earlier commit, interleaved.

    .venv/bin/python benchmarks/before_after_cpu.py --base d3ef742
        # writes benchmarks/results/before_after_cpu.txt

The package as it was at `--base` is extracted from git into a temporary directory under
another name (`flaxattn_base`), so both versions live in one process and every call of one
alternates with the same call of the other (`flaxattn.bench.time_interleaved`): the ratio
new/base compares calls made under the same load. float32 (or --dtype), B=1, N=8, H=64, T = S,
through `dot_product_attention(implementation=...)`; forward, forward+backward (the VJP of a given
output cotangent) and the causal forward; the median over `--rounds` rounds of the per-round
ratios, with their [min, max].
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flaxattn
from flaxattn.bench import compiled_call, time_interleaved

B, N, H = 1, 8, 64
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "before_after_cpu.txt"


def import_base(rev: str, into: Path):
    """The `flaxattn` package of commit `rev`, importable as `flaxattn_base`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "flaxattn"],
                         capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    (into / "flaxattn").rename(into / "flaxattn_base")
    for path in (into / "flaxattn_base").rglob("*.py"):
        text = re.sub(r"\bflaxattn\b(?=[.\s])", "flaxattn_base", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("flaxattn_base")


def calls_for(package, name: str, T: int, implementation: str, dtype: str) -> dict:
    """`{label: ready call}`: forward, forward+backward and causal forward at length T."""
    r = np.random.default_rng(0)
    q, k, v, dout = (jnp.asarray(r.standard_normal((B, T, N, H)), dtype) for _ in range(4))

    def fwd(causal):
        return lambda q, k, v: package.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation)  # fmt: skip

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd(False), q, k, v)
        return vjp(dout)

    return {
        f"{name} forward": compiled_call(fwd(False), q, k, v)[0],
        f"{name} forward+backward": compiled_call(fwd_bwd, q, k, v)[0],
        f"{name} causal forward": compiled_call(fwd(True), q, k, v)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit (e.g. d3ef742)")
    parser.add_argument("--lengths", default="2048,4096", help="T = S values")
    parser.add_argument("--implementations", default="blocked,reference")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base, Path(tmp))
        lines = [
            f"# before_after_cpu.py --base {args.base} --dtype {args.dtype}: new / base time "
            f"(median [min, max] of {args.rounds} rounds, {args.repeats} interleaved calls each)",
            f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
            f"{jax.device_count()} {jax.default_backend()} device(s)",
        ]
        for impl in args.implementations.split(","):
            for T in map(int, args.lengths.split(",")):
                ratios: dict[str, list[float]] = {}
                seconds: dict[str, list[float]] = {}
                calls = {**calls_for(base, "base", T, impl, args.dtype),
                         **calls_for(flaxattn, "new", T, impl, args.dtype)}  # fmt: skip
                for _ in range(args.rounds):
                    timings = time_interleaved(calls, repeats=args.repeats)
                    for label, timing in timings.items():
                        seconds.setdefault(label, []).append(timing.median)
                    for what in ("forward", "forward+backward", "causal forward"):
                        ratios.setdefault(what, []).append(
                            timings[f"new {what}"].median / timings[f"base {what}"].median)
                for what, values in ratios.items():
                    new = statistics.median(seconds[f"new {what}"]) * 1e3
                    old = statistics.median(seconds[f"base {what}"]) * 1e3
                    lines.append(
                        f"{impl:10s} T={T:5d} {what:17s} base {old:8.1f} ms  new {new:8.1f} ms  "
                        f"new/base {statistics.median(values):.3f} "
                        f"[{min(values):.3f}, {max(values):.3f}]"
                    )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
