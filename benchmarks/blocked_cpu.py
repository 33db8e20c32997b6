"""The blocked kernel's CPU targets (issue 2 §7, issue 5 §3), measured in one run.

    .venv/bin/python benchmarks/blocked_cpu.py      # writes benchmarks/results/blocked_cpu.txt
    .venv/bin/python benchmarks/blocked_cpu.py --rounds 1 --lengths 1024 --memory-lengths 1024
                                                    # a smoke run (prints only)

float32, B=1, N=8, H=64, T = S, through `flaxattn.dot_product_attention(implementation=
'blocked')`, against `jax.nn.dot_product_attention(implementation='xla')` and, when torch is
installed, PyTorch's CPU `scaled_dot_product_attention`. Forward+backward is the forward and
the VJP of a given output cotangent (as in training, where dO arrives from the layers above).

Each round measures everything once. For each length and pass, blocked, jax.nn and torch,
causal and not, and the float32 matmul that sets the ceiling, are compiled and then called in
alternation (`flaxattn.bench.time_interleaved`: one warm-up round, then the median of
`--repeats` rounds), so every ratio compares calls made under the same load; the ratios are
computed within the round. The report gives, for each figure, the median over rounds and the
[min, max] range: the machine is shared, so absolute times are noisy and the ratios are what
to read.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

# PyTorch's OpenMP threads busy-wait after each call by default, stealing the cores from the
# XLA call that follows in an interleaved run; passive waiting keeps the peers independent.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

import flaxattn
from flaxattn.bench import (
    attention_flops,
    compiled_call,
    compiled_temp_bytes,
    square_matmul,
    time_interleaved,
)

B, N, H = 1, 8, 64
RESULTS = Path(__file__).parent / "results" / "blocked_cpu.txt"
MIB = 2**20
MATMUL = 2048  # the ceiling: a float32 MATMUL^3 matmul, timed beside the attention calls


def blocked(causal: bool) -> Callable:
    return lambda q, k, v: flaxattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="blocked"
    )


def xla(causal: bool) -> Callable:
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla"
    )


def with_backward(fn: Callable) -> Callable:
    """Forward, then the VJP of the output cotangent `do`: returns (dq, dk, dv)."""
    return lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do)


def inputs(T: int, count: int = 3) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), count)
    return tuple(jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)


def torch_forward_call(T: int, causal: bool) -> Callable[[], object] | None:
    """A zero-argument PyTorch SDPA forward on the same inputs, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    q, k, v = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in inputs(T))

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def measure_round(lengths: list[int], repeats: int) -> dict:
    """One round. For each (T, pass), every peer runs in alternation with the others and with
    the matmul that sets the ceiling (`time_interleaved`), so each ratio compares calls made
    under the same load."""
    result: dict = {"times": {}, "matmul_at": {}}
    matmul = compiled_call(square_matmul, jnp.ones((MATMUL, MATMUL), jnp.float32))[0]
    for T in lengths:
        q, k, v, do = inputs(T, 4)
        for pass_ in ("fwd", "fwd+bwd"):
            calls = {"matmul": matmul}
            for causal in (False, True):
                for name, make in (("blocked", blocked), ("xla", xla)):
                    fn, args = make(causal), (q, k, v)
                    if pass_ == "fwd+bwd":
                        fn, args = with_backward(fn), (q, k, v, do)
                    calls[name, causal] = compiled_call(fn, *args)[0]
                torch_call = torch_forward_call(T, causal) if pass_ == "fwd" else None
                if torch_call is not None:
                    calls["torch", causal] = torch_call
            timings = time_interleaved(calls, repeats=repeats)
            result["matmul_at"][T, pass_] = 2 * MATMUL**3 / timings.pop("matmul").min
            for (name, causal), timing in timings.items():
                result["times"][T, causal, pass_, name] = timing
            print(f"  T={T} {pass_} done", file=sys.stderr, flush=True)
    # The ceiling is the best matmul call of the round: one right after a peer that swept
    # gigabytes of [T, S] temporaries runs slow, and a low ceiling would flatter the kernel.
    result["matmul"] = max(result["matmul_at"].values())
    return result


def seconds(timing) -> float:
    return timing if isinstance(timing, float) else timing.median


def summarise(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    lo, hi = min(values), max(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(lo)}, {fmt.format(hi)}]"


def time_table(rounds: list[dict], lengths: list[int]) -> list[str]:
    has_torch = any(key[3] == "torch" for r in rounds for key in r["times"])
    head = ["T", "causal", "pass", "blocked ms", "GFLOP/s", "of matmul", "jax.nn ms", "speedup"]
    head += ["torch ms", "torch / blocked"] if has_torch else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in lengths:
        for causal in (False, True):
            for pass_ in ("fwd", "fwd+bwd"):
                flops = attention_flops(B, N, T, T, H, causal=causal, backward=pass_ != "fwd")
                get = lambda r, name: seconds(r["times"][T, causal, pass_, name])  # noqa: B023
                ours = [get(r, "blocked") for r in rounds]
                cells = [
                    str(T), "yes" if causal else "no", pass_,
                    summarise([t * 1e3 for t in ours], "{:.0f}"),
                    summarise([flops / t / 1e9 for t in ours], "{:.0f}"),
                    summarise([flops / get(r, "blocked") / r["matmul"] for r in rounds]),
                    summarise([get(r, "xla") * 1e3 for r in rounds], "{:.0f}"),
                    summarise([get(r, "xla") / get(r, "blocked") for r in rounds]),
                ]
                if has_torch:
                    if pass_ == "fwd":
                        cells += [
                            summarise([get(r, "torch") * 1e3 for r in rounds], "{:.0f}"),
                            summarise([get(r, "torch") / get(r, "blocked") for r in rounds]),
                        ]
                    else:
                        cells += ["-", "-"]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(rounds: list[dict], lengths: list[int]) -> list[str]:
    """The issues' targets at the largest length measured (4096 by default); ratios per round."""
    T = max(lengths)

    def t(r, causal, pass_, name):
        return seconds(r["times"][T, causal, pass_, name])

    def frac(r, causal, pass_):
        flops = attention_flops(B, N, T, T, H, causal=causal, backward=pass_ != "fwd")
        return flops / t(r, causal, pass_, "blocked") / r["matmul"]

    rows = [
        (f"T={T} fwd: jax.nn time / blocked time", ">= 3.5", 3.5,
         [t(r, False, "fwd", "xla") / t(r, False, "fwd", "blocked") for r in rounds]),
        (f"T={T} fwd+bwd: jax.nn time / blocked time", ">= 2.5", 2.5,
         [t(r, False, "fwd+bwd", "xla") / t(r, False, "fwd+bwd", "blocked") for r in rounds]),
        (f"T={T} causal fwd time / non-causal fwd time", "<= 0.55", -0.55,
         [t(r, True, "fwd", "blocked") / t(r, False, "fwd", "blocked") for r in rounds]),
    ]
    for length in [x for x in lengths if x >= 2048]:
        T = length
        rows += [
            (f"T={T} fwd, non-causal: fraction of matmul", ">= 0.75", 0.75,
             [frac(r, False, "fwd") for r in rounds]),
            (f"T={T} fwd+bwd, non-causal: fraction of matmul", ">= 0.55", 0.55,
             [frac(r, False, "fwd+bwd") for r in rounds]),
        ]
    T = max(lengths)
    if all((T, False, "fwd", "torch") in r["times"] for r in rounds):
        rows.append((f"T={T} fwd: torch time / blocked time", ">= 1.0", 1.0,
                     [t(r, False, "fwd", "torch") / t(r, False, "fwd", "blocked") for r in rounds]))
    lines = [
        "| target | required | measured: median [min, max] | met (median) |",
        "|---|---|---|---|",
    ]
    for name, required, bound, values in rows:
        med = statistics.median(values)
        met = med >= bound if bound > 0 else med <= -bound
        lines.append(f"| {name} | {required} | {summarise(values)} | {'yes' if met else 'NO'} |")
    return lines


def memory_table(lengths: list[int]) -> list[str]:
    """Compiled temporary bytes (XLA's memory_analysis), blocked at every length, jax.nn too."""
    lines = [
        "| T | blocked fwd MiB | blocked fwd+bwd MiB | blocked grad(sum) MiB | jax.nn fwd MiB "
        "| jax.nn fwd+bwd MiB |",
        "|---|---|---|---|---|---|",
    ]
    for T in lengths:
        x = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
        grad_sum = lambda q, k, v: jax.grad(
            lambda q, k, v: blocked(False)(q, k, v).sum(), argnums=(0, 1, 2)
        )(q, k, v)
        cells = [
            compiled_temp_bytes(blocked(False), x, x, x),
            compiled_temp_bytes(with_backward(blocked(False)), x, x, x, x),
            compiled_temp_bytes(grad_sum, x, x, x),
            compiled_temp_bytes(xla(False), x, x, x),
            compiled_temp_bytes(with_backward(xla(False)), x, x, x, x),
        ]
        lines.append(f"| {T} | " + " | ".join(f"{c / MIB:.1f}" for c in cells) + " |")
    return lines


def device_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch_version = "not installed"
    try:
        import torch

        torch_version = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    return (f"device: {cpu}, {os.cpu_count()} cores; jax {jax.__version__}; "
            f"torch {torch_version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,4096", help="T = S values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="full repetitions of the run")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--memory-lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report file (default {RESULTS} for the default lengths)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    memory_lengths = [int(x) for x in args.memory_lengths.split(",")]
    out = args.out
    if out is None and args.lengths == "2048,4096" and args.rounds >= 3:
        out = RESULTS

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        rounds.append(measure_round(lengths, args.repeats))
    load_after = os.getloadavg()

    report = [
        "# flaxattn blocked attention on CPU: targets of issues 2 (§7) and 5 (§3)",
        "",
        f"command: python benchmarks/blocked_cpu.py {' '.join(sys.argv[1:])}".rstrip(),
        f"{device_line()}",
        f"date: {started:%Y-%m-%d %H:%M} UTC; load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (the machine has {os.cpu_count()} cores and is shared)",
        f"setting: float32, B={B}, N={N}, H={H}, T=S; {args.rounds} rounds x {args.repeats} "
        "timed calls; every figure is the median over rounds [min, max] of per-round values",
        "",
        f"float32 matmul throughput ({MATMUL}^3, timed in alternation with the attention "
        "calls; the best call of each round): "
        + ", ".join(f"{r['matmul'] / 1e9:.0f}" for r in rounds) + " GFLOP/s",
        "",
        "## Targets (ratios computed within each round)",
        "",
        *targets(rounds, lengths),
        "",
        "## Times",
        "",
        "fwd+bwd FLOPs count the backward as 2.5 forwards; causal FLOPs are half.",
        "",
        *time_table(rounds, lengths),
        "",
        "## Compiled temporary memory (XLA memory_analysis, non-causal)",
        "",
        "fwd+bwd: forward and VJP of an input cotangent dO; grad(sum): jax.grad of out.sum(),",
        "where XLA materialises the all-ones dO as a temporary (+B·T·N·H·4 bytes).",
        "",
        *memory_table(memory_lengths),
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
