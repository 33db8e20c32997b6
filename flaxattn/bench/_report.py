"""Reading results: a table for the terminal (or markdown), and plots against sequence length."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

_COLUMNS = (
    ("impl", lambda r: r["implementation"] + (" (interpret)" if r.get("interpret") else "")),
    ("T", lambda r: str(r["seq_len"])),
    ("H", lambda r: str(r["head_dim"])),
    ("N/K", lambda r: f"{r['num_heads']}/{r['num_kv_heads']}"),
    ("dtype", lambda r: r["dtype"]),
    ("causal", lambda r: "yes" if r["causal"] else "no"),
    ("pass", lambda r: r["pass"]),
    ("median ms", lambda r: _num(r["time_median_s"], 1e3)),
    ("min-max ms", lambda r: _range(r)),
    ("TFLOP/s", lambda r: _num(r["tflops"], 1, 3)),
    ("of peak", lambda r: _pct(r["fraction_of_peak"])),
    ("temp MiB", lambda r: _num(r["temp_memory_bytes"], 2**-20, 1)),
    ("max err", lambda r: _sci(r["max_abs_error"])),
    ("grad err", lambda r: _sci(r["max_abs_grad_error"])),
    ("approx err", lambda r: _sci(r.get("approx_error"))),
    ("status", lambda r: r["status"] if r["status"] != "ok" else "ok"),
)


def _num(x, factor=1.0, digits=2):
    return "" if x is None else f"{x * factor:.{digits}f}"


def _pct(x):
    return "" if x is None else f"{100 * x:.0f}%"


def _sci(x):
    return "" if x is None else f"{x:.1e}"


def _range(r):
    if r["time_min_s"] is None:
        return ""
    return f"{r['time_min_s'] * 1e3:.1f}-{r['time_max_s'] * 1e3:.1f}"


def _impl_rank(name: str):
    from flaxattn.bench._implementations import IMPLEMENTATIONS

    names = list(IMPLEMENTATIONS)
    return (names.index(name) if name in names else len(names), name)


def _order(r: Record):
    return (r["dtype"], r["head_dim"], r["num_heads"], r["num_kv_heads"], r["causal"],
            r["pass"], r["seq_len"], _impl_rank(r["implementation"]))


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def format_table(records: Sequence[Record], *, markdown: bool = False) -> str:
    """One row per record, grouped by setting then length; skipped/unsupported rows keep their
    reason in the status column (truncated for the terminal)."""
    rows = [[get(r) for _, get in _COLUMNS] for r in sorted(records, key=_order)]
    for row, r in zip(rows, sorted(records, key=_order), strict=True):
        if r["status"] != "ok" and r.get("reason"):
            row[-1] = f"{r['status']}: {r['reason']}"
        if not markdown and len(row[-1]) > 60:
            row[-1] = row[-1][:57] + "..."
    header = [name for name, _ in _COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


_METRICS = {  # file suffix: (field, axis label, log y, multiplier)
    "time": ("time_median_s", "median time per call (s)", True, 1.0),
    "fraction_of_peak": (
        "fraction_of_peak", "fraction of same-dtype matmul throughput", False, 1.0),
    "memory": ("temp_memory_bytes", "compiled temporary memory (MiB)", True, 2**-20),
}


def plot_records(records: Sequence[Record], stem: str | os.PathLike) -> list[Path]:
    """Write `<stem>_time.png`, `<stem>_fraction_of_peak.png`, `<stem>_memory.png`.

    One panel per (pass, causal); one line per implementation (and per dtype, head dim or
    heads where the records have several). Only `ok` records that were not interpreted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r["status"] == "ok" and not r.get("interpret")]
    if not ok:
        return []
    passes = sorted({r["pass"] for r in ok}, key=("fwd", "fwd+bwd").index)
    causals = sorted({r["causal"] for r in ok})
    varying = [
        key for key in ("dtype", "head_dim", "num_kv_heads")
        if len({r[key] for r in ok}) > 1
    ]
    labels = {"dtype": "{}", "head_dim": "H={}", "num_kv_heads": "K={}"}
    impls = sorted({r["implementation"] for r in ok}, key=_impl_rank)
    lengths = sorted({r["seq_len"] for r in ok})
    colors = {name: f"C{i}" for i, name in enumerate(impls)}
    styles = ["-", "--", ":", "-."]
    first = ok[0]
    title = f"{first['device']} · jax {first['jax_version']}"
    paths = []
    for name, (field, ylabel, log_y, factor) in _METRICS.items():
        fig, axes = plt.subplots(
            len(passes), len(causals), figsize=(5.5 * len(causals), 4 * len(passes)),
            squeeze=False, sharex=True,
        )
        for (i, pass_), (j, causal) in _grid(passes, causals):
            ax = axes[i][j]
            series: dict[tuple, list[Record]] = {}
            for r in ok:
                if r["pass"] == pass_ and r["causal"] == causal and r[field] is not None:
                    key = (r["implementation"], *(r[k] for k in varying))
                    series.setdefault(key, []).append(r)
            variants = sorted({key[1:] for key in series}, key=str)
            for key, rs in sorted(series.items(), key=lambda kv: (_impl_rank(kv[0][0]), kv[0])):
                rs.sort(key=lambda r: r["seq_len"])
                label = " ".join([key[0]] + [labels[k].format(v) for k, v in
                                             zip(varying, key[1:], strict=True)])
                ax.plot(
                    [r["seq_len"] for r in rs], [r[field] * factor for r in rs], marker="o", ms=3,
                    color=colors[key[0]], ls=styles[variants.index(key[1:]) % len(styles)],
                    label=label,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [_length_label(n) for n in lengths])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{pass_}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length T = S")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(f"{stem}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _grid(rows, cols):
    return [((i, a), (j, b)) for i, a in enumerate(rows) for j, b in enumerate(cols)]
