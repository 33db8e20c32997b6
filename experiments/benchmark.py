"""Benchmark every attention implementation on this machine: time, TFLOP/s, memory, error.

    python experiments/benchmark.py [--preset tiny|cpu|gpu|tpu] [--out FILE.jsonl] [overrides]
    python experiments/benchmark.py --report FILE.jsonl        # table and plots of a past run

The preset defaults to the backend's (cpu, gpu or tpu); `tiny` finishes in about a minute on
a CPU. Overrides replace one field of the preset, e.g.
`--seq-lens 1024,2048 --impls blocked,xla --dtypes float32 --repeats 5`.
Writes one JSON line per (length, setting, implementation, pass) to --out (default
runs/bench/<platform>_<preset>_<time>.jsonl), prints a table, and saves the plots
<out>_time.png, <out>_fraction_of_peak.png and <out>_memory.png next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import _cli

from flaxattn.bench import (
    IMPLEMENTATIONS,
    PRESETS,
    check_sweep,
    format_table,
    load_records,
    plot_records,
    run_sweep,
)


def _list(kind):
    def parse(text: str):
        try:
            values = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


# flag -> Sweep field
_OVERRIDES = {
    "seq_lens": "seq_lens", "head_dims": "head_dims", "num_heads": "num_heads",
    "gqa_ratios": "gqa_ratios", "dtypes": "dtypes", "passes": "passes",
    "impls": "implementations", "batch": "batch", "repeats": "repeats",
    "memory_budget_gb": "memory_budget_gb", "max_seconds": "max_seconds",
    "matmul_size": "matmul_size",
}


def main(argv: list[str] | None = None) -> int:
    parser = _cli.make_parser(__doc__)
    parser.add_argument("--preset", choices=tuple(PRESETS), help="default: the backend's")
    parser.add_argument("--out", help="JSON-lines results file (plots go next to it)")
    parser.add_argument("--report", metavar="FILE.jsonl", help="re-print and re-plot; no run")
    parser.add_argument("--seq-lens", type=_list(int), help="e.g. 1024,2048")
    parser.add_argument("--head-dims", type=_list(int), help="e.g. 64,128")
    parser.add_argument("--num-heads", type=_list(int), help="query heads N")
    parser.add_argument("--gqa-ratios", type=_list(int), help="N / K, e.g. 1,4")
    parser.add_argument("--dtypes", type=_list(str), help="float32,bfloat16,float16")
    parser.add_argument("--causal", choices=("both", "true", "false"))
    parser.add_argument("--passes", type=_list(str), help="fwd,fwd+bwd")
    parser.add_argument("--impls", type=_list(str), help=", ".join(IMPLEMENTATIONS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int, help="timed calls after one warm-up")
    parser.add_argument("--memory-budget-gb", type=_optional_float,
                        help="skip [T, S]-materialising implementations above this ('none')")
    parser.add_argument("--max-seconds", type=_optional_float,
                        help="skip points predicted (T² from the last length) to take longer")
    parser.add_argument("--matmul-size", type=int, help="side of the peak-measuring matmul")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.report:
        records = load_records(_cli.check_readable_file(args.report))
        _report(records, Path(args.report), plots=not args.no_plots)
        return 0

    import jax

    platform = jax.default_backend()
    preset = args.preset or (platform if platform in PRESETS else "cpu")
    overrides = {
        field: getattr(args, flag) for flag, field in _OVERRIDES.items()
        if getattr(args, flag) is not None
    }
    if args.causal is not None:
        overrides["causal"] = {"both": (False, True), "true": (True,), "false": (False,)}[
            args.causal]
    sweep = dataclasses.replace(PRESETS[preset], **overrides)
    try:
        check_sweep(sweep, IMPLEMENTATIONS)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out) if args.out else Path(
        "runs", "bench", f"{platform}_{preset}_{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    _cli.check_writable_dir(out.parent)
    command = " ".join(["python", "experiments/benchmark.py", *map(shlex.quote, sys.argv[1:])])
    records = run_sweep(sweep, preset=preset, command=command, out=out, progress=not args.quiet)
    _report(records, out, plots=not args.no_plots)
    return 0


def _report(records, path: Path, *, plots: bool) -> None:
    print(format_table(records))
    if records:
        print(f"\ndevice: {records[0]['device']} · jax {records[0]['jax_version']}")
    print(f"results: {path}")
    if plots:
        for figure in plot_records(records, path.with_suffix("")):
            print(f"plot: {figure}")


if __name__ == "__main__":
    _cli.run_cli(main)
