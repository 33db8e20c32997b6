"""Figures of `flaxattn.interp` / pattern-score results: `[L, N]` tables with their values,
patching tables side by side, and scores against training steps (the phase change)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

from flaxattn.viz._plots import (
    _annotate,
    _draw_matrix,
    _finish,
    _two_lines,
    _wrap,
    layer_table_shape,
)


def _table(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty [L, N] table, got shape {a.shape}")
    return a


def _draw_table(fig, ax, a, names, *, cmap, center, vmin, vmax, fmt, label):
    valid = np.isfinite(a)
    finite = a[valid]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    lo, hi = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
    if center is not None:
        span = max(abs(hi - center), abs(center - lo), 1e-9)
        norm = colors.TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    else:
        norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    im = _draw_matrix(ax, np.where(valid, a, 0.0), valid, cmap=cmap, norm=norm)
    L, N = a.shape
    if L * N <= 128:
        _annotate(ax, a, valid, _Darkness(norm, cmap), fmt=fmt, size=8 if L * N <= 32 else 6)
    ax.set_xticks(np.arange(N), [str(i) for i in range(N)], fontsize=8)
    ax.set_yticks(np.arange(L), [_two_lines(n) for n in names], fontsize=7)
    ax.set_xlabel("head")
    fig.colorbar(im, ax=ax, pad=0.02, shrink=0.9, label=label)


class _Darkness:
    """The luminance of a value's colour, so that `_annotate` writes white on dark cells
    (below 0.6) whatever the colour map's direction."""

    def __init__(self, norm, cmap: str):
        self.norm, self.cmap = norm, colormaps[cmap]

    def __call__(self, v):
        r, g, b, _ = self.cmap(float(self.norm(v)))
        return 0.299 * r + 0.587 * g + 0.114 * b


def plot_head_table(
    values,
    layer_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    label: str = "",
    cmap: str = "viridis",
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
    path: str | os.PathLike | None = None,
) -> Figure:
    """One `[L, N]` table (layer x head) as a heatmap with each cell's value written in it.

    Args:
      values: `[L, N]` (NaN cells drawn grey and hatched), e.g. `flaxattn.interp.ablate_heads`
        or one of `flaxattn.analysis.pattern_scores`.
      layer_names: the L row labels (default `layer 0`, ...).
      title: figure title. label: colour-bar label.
      cmap: colour map; with `center`, a diverging norm around that value (e.g. 0 for a
        change, then use a diverging map such as `'RdBu_r'`).
      vmin, vmax: colour range (default the data's).
      fmt: format of the written values.
      path: also save the figure there.
    """
    return plot_head_tables({title or "": values}, layer_names, label=label, cmap=cmap,
                            center=center, vmin=vmin, vmax=vmax, fmt=fmt, path=path)


def plot_head_tables(
    tables: Mapping[str, object],
    layer_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    label: str = "",
    cmap: str = "viridis",
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Several `[L, N]` tables side by side, one panel each (`{panel title: [L, N]}`), e.g.
    zero- and mean-ablation, or patching results; arguments as in `plot_head_table`."""
    if not tables:
        raise ValueError("plot_head_tables needs at least one table")
    arrays = {k: _table(v, f"tables[{k!r}]") for k, v in tables.items()}
    names, L, N = layer_table_shape(arrays, layer_names)
    K = len(arrays)
    panel_w, panel_h = 1.6 + 0.6 * N, 1.0 + 0.5 * L
    fig = Figure(figsize=(min(1.2 + K * panel_w, 20), min(max(panel_h + 1.0, 2.8), 14)),
                 layout="constrained")
    axes = fig.subplots(1, K, squeeze=False)[0]
    for ax, (key, a) in zip(axes, arrays.items(), strict=True):
        _draw_table(fig, ax, a, names, cmap=cmap, center=center, vmin=vmin, vmax=vmax, fmt=fmt,
                    label=label)
        if ax is not axes[0]:
            ax.set_yticklabels([])
        if key:
            ax.set_title(_wrap(key, fig), fontsize=9)
    if title:
        fig.suptitle(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)


def plot_patching(
    recovered: Mapping[str, object],
    layer_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Recovered fractions `{panel title: [L, N]}` of activation patching, side by side, on
    one diverging scale: 1 (blue) = the clean metric, 0 (red) = the corrupted one."""
    finite = [np.asarray(v, np.float64) for v in recovered.values()]
    lo = min([0.0] + [float(np.nanmin(a)) for a in finite if np.isfinite(a).any()])
    hi = max([1.0] + [float(np.nanmax(a)) for a in finite if np.isfinite(a).any()])
    return plot_head_tables(recovered, layer_names, title=title, label="recovered fraction",
                            cmap="RdBu", center=0.5, vmin=lo, vmax=hi, path=path)


def plot_scores_over_steps(
    steps: Sequence[int] | np.ndarray,
    scores: Mapping[str, Any],
    losses: Mapping[str, Any],
    *,
    mark_step: int | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Head scores (top) and losses (bottom) against training step, sharing the step axis.

    Args:
      steps: the evaluation steps.
      scores: `{name: one value per step}`, e.g. `'L1H1 induction'`.
      losses: `{name: one value per step}`, e.g. first- and repeated-half loss.
      mark_step: a step to mark with a vertical line on both panels (e.g. the phase change).
      title: figure title. path: also save the figure there.
    """
    steps = np.asarray(steps)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"steps must be a non-empty 1-d sequence, got shape {steps.shape}")
    for group, name in ((scores, "scores"), (losses, "losses")):
        if not group:
            raise ValueError(f"{name} must name at least one series")
        bad = {k: np.shape(v) for k, v in group.items() if np.shape(v) != steps.shape}
        if bad:
            raise ValueError(f"{name}: every series needs {steps.size} values (one per step), "
                             f"got {bad}")
    fig = Figure(figsize=(7.0, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, ys in scores.items():
        top.plot(steps, ys, "-", label=name, linewidth=1.4)
    top.set_ylabel("score")
    top.set_ylim(-0.02, 1.02)
    for name, ys in losses.items():
        bottom.plot(steps, ys, "-", label=name, linewidth=1.6)
    bottom.set_ylabel("loss (nats)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right", ncol=1 if len(ax.lines) <= 6 else 2)
        if mark_step is not None:
            ax.axvline(mark_step, color="#555555", linestyle="--", linewidth=1.0)
    if mark_step is not None:
        top.annotate(f"step {mark_step}", (mark_step, 1.0), xytext=(4, -12),
                     textcoords="offset points", fontsize=8, color="#333333")
    if title:
        fig.suptitle(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)
