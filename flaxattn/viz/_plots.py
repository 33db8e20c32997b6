"""The matplotlib figures of :mod:`flaxattn.viz` (see the package docstring)."""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from flaxattn import analysis

__all__ = [
    "FORMATS",
    "plot_attention_grid",
    "plot_export",
    "plot_head_stats",
    "plot_heatmap",
    "plot_rollout",
    "plot_text_attention",
    "plot_training_curves",
    "read_metrics",
    "save_figure",
    "text_attention_html",
]

FORMATS = ("png", "pdf", "svg")
MASKED_COLOR = "#d0d0d0"
MAX_LABELS = 40
# Token labels: a list of strings or a numpy array of them (as exports store them).
Tokens = Sequence | np.ndarray


# ----------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write ``fig`` atomically; the format comes from the suffix (none: ``.png`` is added)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    fmt = path.suffix[1:].lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported figure format {fmt!r} ({path}); use one of {FORMATS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- helpers


def _label(token: Any, width: int = 12) -> str:
    text = str(token)
    text = {" ": "␣", "\n": "\\n", "\t": "\\t", "": "·"}.get(text, text)
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return text if len(text) <= width else text[: width - 1] + "…"


def _set_ticks(
    ax, axis: str, tokens: Tokens | None, n: int, max_labels: int = MAX_LABELS
):
    """Token labels on one axis, thinned to at most ``max_labels``."""
    step = max(1, math.ceil(n / max_labels))
    pos = np.arange(0, n, step)
    if tokens is None:
        labels = [str(i) for i in pos]
    else:
        labels = [_label(tokens[i]) + (f" ({i})" if step > 1 else "") for i in pos]
    size = 8 if n <= 24 else 7
    if axis == "x":
        rotation = 90 if max((len(t) for t in labels), default=0) > 2 else 0
        ax.set_xticks(pos, labels, rotation=rotation, fontsize=size)
    else:
        ax.set_yticks(pos, labels, fontsize=size)


def _valid2d(shape, query_length=None, key_length=None, mask=None) -> np.ndarray:
    T, S = shape
    valid = np.ones((T, S), dtype=bool)
    if query_length is not None:
        valid[int(query_length) :] = False
    if key_length is not None:
        valid[:, int(key_length) :] = False
    if mask is not None:
        valid &= np.broadcast_to(np.asarray(mask, dtype=bool), (T, S))
    return valid


def _draw_matrix(
    ax, w: np.ndarray, valid: np.ndarray, *, cmap="viridis", vmin=0.0, vmax=None, norm=None
):
    """imshow with invalid cells transparent over a grey hatched background."""
    T, S = w.shape
    ax.add_patch(
        Rectangle(
            (-0.5, -0.5),
            S,
            T,
            facecolor=MASKED_COLOR,
            edgecolor="#8c8c8c",
            hatch="///",
            linewidth=0,
            zorder=0,
        )
    )
    cm = colormaps[cmap].with_extremes(bad=(0, 0, 0, 0)) if isinstance(cmap, str) else cmap
    if norm is None:
        vmax = vmax if vmax is not None else max(float(np.max(w[valid], initial=0.0)), 1e-6)
        norm = colors.Normalize(vmin=vmin, vmax=vmax)
    data = np.ma.masked_array(np.asarray(w, dtype=np.float64), mask=~valid)
    im = ax.imshow(data, cmap=cm, norm=norm, interpolation="nearest", aspect="auto", zorder=1)
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(T - 0.5, -0.5)
    return im


def _annotate(ax, w: np.ndarray, valid: np.ndarray, norm, fmt="{:.2f}", size=7):
    for (i, j), v in np.ndenumerate(w):
        if valid[i, j] and np.isfinite(v):
            dark = norm(v) < 0.6
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                fontsize=size,
                color="white" if dark else "black",
                zorder=2,
            )


def _masked_legend(ax, loc="upper left", anchor=(1.0, -0.02)):
    ax.legend(
        handles=[Patch(facecolor=MASKED_COLOR, edgecolor="#8c8c8c", hatch="///", label="masked")],
        loc=loc,
        bbox_to_anchor=anchor,
        fontsize=7,
        frameon=False,
        handlelength=1.5,
    )


def _cell_figsize(T: int, S: int, extra_w=2.4, extra_h=1.6, cell=0.28, span=9.0):
    """Figure size for a [T, S] matrix: ``cell`` inches per token, at most ``span`` inches."""
    cell = min(cell, span / max(T, S, 1))
    width = min(max(extra_w + cell * S, 4.5), extra_w + span)
    height = min(max(extra_h + cell * T, 2.8), extra_h + span)
    return width, height


# ----------------------------------------------------------------------------- heatmap


def plot_heatmap(
    weights,
    query_tokens: Tokens | None = None,
    key_tokens: Tokens | None = None,
    *,
    query_length: int | None = None,
    key_length: int | None = None,
    mask=None,
    title: str | None = None,
    cmap: str = "viridis",
    vmax: float | None = None,
    annotate: bool | None = None,
    xlabel: str = "key",
    ylabel: str = "query",
    ax=None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One head's weights ``[T, S]`` with token labels on both axes and a colorbar.

    ``query_length`` / ``key_length`` (right padding) and ``mask`` (True = valid) mark cells as
    masked: they are drawn grey and hatched. ``annotate`` writes the values in the cells
    (default: when the matrix is at most 12 x 12).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"plot_heatmap needs one head's weights [T, S], got shape {w.shape}")
    T, S = w.shape
    for name, toks, n in (("query_tokens", query_tokens, T), ("key_tokens", key_tokens, S)):
        if toks is not None and len(toks) != n:
            raise ValueError(f"{name} has {len(toks)} entries, the weights {n}")
    valid = _valid2d(w.shape, query_length, key_length, mask)
    if ax is None:
        fig = Figure(figsize=_cell_figsize(T, S), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    im = _draw_matrix(ax, w, valid, cmap=cmap, vmax=vmax)
    if annotate or (annotate is None and max(T, S) <= 12):
        _annotate(ax, w, valid, im.norm)
    _set_ticks(ax, "x", key_tokens, S)
    _set_ticks(ax, "y", query_tokens, T)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(_wrap(title, fig, fraction=0.7), fontsize=10)
    fig.colorbar(im, ax=ax, label="attention weight", shrink=0.9 if T > 6 else 1.0, pad=0.02)
    if not valid.all():
        _masked_legend(ax)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- grid


def _wrap(title: str, fig: Figure, fontsize: float = 10, fraction: float = 0.95) -> str:
    """Wrap a title to ``fraction`` of the figure's width (about 0.6 em per character)."""
    width = max(20, int(fraction * fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(title, width=width, break_long_words=False)) or title


def _two_lines(name: str, width: int = 26) -> str:
    """A long layer name split at a '/' or space near the middle, then shortened."""
    if len(name) <= width:
        return name
    cuts = [i for i, c in enumerate(name) if c in "/ "]
    if cuts:
        cut = min(cuts, key=lambda i: abs(i - len(name) / 2)) + 1
        return "\n".join(_short(part.strip(), width) for part in (name[:cut], name[cut:]))
    return _short(name, width)


def _short(path: str, width: int = 22) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def plot_attention_grid(
    layers: Mapping[str, Any],
    *,
    lengths: Mapping[str, tuple[int | None, int | None]] | None = None,
    tokens: Mapping[str, tuple[Tokens, Tokens]] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    gamma: float = 0.5,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Every layer (rows) x head (columns) of one example: ``layers[path]`` is ``[N, T, S]``.

    ``lengths[path] = (query_length, key_length)`` masks padding; ``tokens[path] = (query
    tokens, key tokens)`` labels the outer panels when sequences are short. All panels share
    one colour scale, power-law with exponent ``gamma`` (0.5: square root) so that diffuse
    heads stay visible next to sharp ones; ``gamma=1`` is linear.
    """
    names = list(layers)
    if not names:
        raise ValueError("plot_attention_grid needs at least one layer")
    arrays = {}
    for name in names:
        a = np.asarray(layers[name], dtype=np.float64)
        if a.ndim != 3:
            raise ValueError(f"layer {name!r} must be [N, T, S] for one example, got {a.shape}")
        arrays[name] = a
    L, N = len(names), max(a.shape[0] for a in arrays.values())
    T = max(a.shape[1] for a in arrays.values())
    S = max(a.shape[2] for a in arrays.values())
    panel = 2.1 if max(T, S) <= 24 else 1.7
    scale = min(1.0, 24.0 / (panel * N + 1.5), 30.0 / (panel * L + 1.0))
    fig = Figure(
        figsize=((panel * N + 1.5) * scale, (panel * L + 1.0) * scale), layout="constrained"
    )
    axes = fig.subplots(L, N, squeeze=False)
    vmax, valids = 1e-6, {}
    for name, a in arrays.items():
        ql, kl = (lengths or {}).get(name, (None, None))
        valids[name] = _valid2d(a.shape[1:], ql, kl)
        if valids[name].any():
            vmax = max(vmax, float(a[:, valids[name]].max()))
    norm = colors.PowerNorm(gamma=gamma, vmin=0.0, vmax=vmax)
    show_labels = tokens is not None and max(T, S) <= 16
    im, any_masked = None, False
    for r, name in enumerate(names):
        a = arrays[name]
        for c in range(N):
            ax = axes[r, c]
            if c >= a.shape[0]:
                ax.set_axis_off()
                continue
            im = _draw_matrix(ax, a[c], valids[name], cmap=cmap, norm=norm)
            any_masked |= not valids[name].all()
            q_tok, k_tok = (tokens or {}).get(name, (None, None))
            below = (tokens or {}).get(names[r + 1], (None, None))[1] if r + 1 < L else None
            differs = k_tok is not None and (
                below is None or list(map(str, below)) != list(map(str, k_tok))
            )
            if show_labels and k_tok is not None and (r == L - 1 or differs):
                _set_ticks(ax, "x", k_tok, a.shape[2])
            else:
                ax.set_xticks([])
            if show_labels and c == 0 and q_tok is not None:
                _set_ticks(ax, "y", q_tok, a.shape[1])
            else:
                ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {c}", fontsize=9)
            if c == 0:
                ax.set_ylabel(_two_lines(name), fontsize=8)
    cbar = fig.colorbar(im, ax=axes, label="attention weight", shrink=0.6, pad=0.01)
    cbar.ax.tick_params(labelsize=7)
    if title or any_masked:
        text = (title or "") + ("   (grey hatched: masked)" if any_masked else "")
        fig.suptitle(_wrap(text, fig), fontsize=10)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- rollout


def plot_rollout(
    rollout,
    tokens: Tokens | None = None,
    *,
    length: int | None = None,
    query_index: int | None = None,
    title: str | None = "attention rollout",
    cmap: str = "magma",
    path: str | os.PathLike | None = None,
) -> Figure:
    """A rollout matrix ``[T, T]`` (from :func:`flaxattn.analysis.attention_rollout`) next to
    the relevance of each input token: the rollout row ``query_index``, or the mean over valid
    rows when it is None."""
    r = np.asarray(rollout, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"plot_rollout needs a square [T, T] rollout, got shape {r.shape}")
    T = r.shape[0]
    n = T if length is None else int(length)
    valid = _valid2d(r.shape, n, n)
    w, h = _cell_figsize(T, T, extra_w=2.0, cell=0.24, span=7.0)
    fig = Figure(figsize=(w * 1.75, h), layout="constrained")
    ax_m, ax_b = fig.subplots(1, 2, width_ratios=[1.0, 0.8])
    vmax = max(float(r[valid].max(initial=0.0)), 1e-6)
    # Square-root colour scale: rollout mass piles up on a few tokens (often the first).
    im = _draw_matrix(ax_m, r, valid, cmap=cmap, norm=colors.PowerNorm(0.5, vmin=0.0, vmax=vmax))
    _set_ticks(ax_m, "x", tokens, T)
    _set_ticks(ax_m, "y", tokens, T)
    ax_m.set_xlabel("input token")
    ax_m.set_ylabel("position (top layer)")
    fig.colorbar(im, ax=ax_m, label="rolled-out attention (square-root scale)", pad=0.02)
    if not valid.all():
        _masked_legend(ax_m)
    if query_index is None:
        rel, what = r[:n, :n].mean(0) if n else np.zeros(0), "mean over positions"
    else:
        if not -n <= query_index < n:
            raise ValueError(f"query_index {query_index} out of range for length {n}")
        rel, what = r[query_index, :n], f"row {query_index % n}"
    ax_b.bar(np.arange(n), rel, color=colormaps[cmap](0.55), width=0.8)
    ax_b.set_xlim(-0.5, max(n, 1) - 0.5)
    _set_ticks(ax_b, "x", None if tokens is None else list(tokens)[:n], n)
    ax_b.set_ylabel("relevance")
    ax_b.set_title(f"input relevance ({what})", fontsize=9)
    ax_b.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- statistics

_STAT_TITLES = {
    "entropy": "entropy ({unit})",
    "distance": "mean attention distance (positions)",
    "sink": "first-token (sink) mass",
}


def layer_table_shape(
    arrays: Mapping[str, np.ndarray], layer_names: Sequence[str] | None
) -> tuple[list[str], int, int]:
    """`(row labels, L, N)` of several `[L, N]` tables that must agree; `ValueError` if not.

    Args:
      arrays: `{name: [L, N]}`, at least one.
      layer_names: the L row labels, or None for `layer 0`, `layer 1`, ...
    """
    L, N = next(iter(arrays.values())).shape
    if any(a.shape != (L, N) for a in arrays.values()):
        raise ValueError(f"every table must be [L, N]; got {[a.shape for a in arrays.values()]}")
    names = list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(L)]
    if len(names) != L:
        raise ValueError(f"{len(names)} layer names for {L} layers")
    return names, L, N


def plot_head_stats(
    stats: Mapping[str, Any],
    layer_names: Sequence[str] | None = None,
    *,
    unit: str = "nats",
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Per-head statistics as layer x head heatmaps, one panel per statistic.

    ``stats``: ``{name: [L, N]}``, e.g. from :func:`flaxattn.analysis.layer_head_stats`
    (entropy, distance, sink); NaN cells (no such head) are drawn grey and hatched.
    """
    if not stats:
        raise ValueError("plot_head_stats needs at least one statistic")
    arrays = {k: np.atleast_2d(np.asarray(v, dtype=np.float64)) for k, v in stats.items()}
    names, L, N = layer_table_shape(arrays, layer_names)
    K = len(arrays)
    panel_w, panel_h = 0.9 + 0.5 * N, 0.8 + 0.42 * L
    fig = Figure(
        figsize=(min(2.0 + K * (panel_w + 1.0), 20), min(max(panel_h + 1.2, 3.0), 14)),
        layout="constrained",
    )
    axes = fig.subplots(1, K, squeeze=False)[0]
    for ax, (key, a) in zip(axes, arrays.items(), strict=True):
        valid = np.isfinite(a)
        cmap = "cividis" if key == "sink" else "viridis"
        vmax = float(a[valid].max()) if valid.any() else 1.0
        vmin = float(a[valid].min()) if valid.any() else 0.0
        if key == "sink":
            vmin, vmax = 0.0, max(vmax, 1e-6)
        im = _draw_matrix(
            ax,
            np.where(valid, a, 0.0),
            valid,
            cmap=cmap,
            vmin=min(vmin, vmax),
            vmax=vmax if vmax > vmin else vmin + 1e-6,
        )
        if L * N <= 96:
            _annotate(ax, a, valid, im.norm, fmt="{:.2f}" if vmax < 10 else "{:.1f}", size=7)
        ax.set_xticks(np.arange(N), [str(i) for i in range(N)], fontsize=8)
        ax.set_yticks(np.arange(L), [_two_lines(n) for n in names], fontsize=7)
        if ax is not axes[0]:
            ax.set_yticklabels([])
        ax.set_xlabel("head")
        ax.set_title(_STAT_TITLES.get(key, key).format(unit=unit), fontsize=9)
        fig.colorbar(im, ax=ax, pad=0.02, shrink=0.9)
    if title:
        fig.suptitle(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- text


def _text_inputs(tokens, weights, length, marked):
    toks = [str(t) for t in tokens]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(toks) != w.shape[0]:
        raise ValueError(f"{len(toks)} tokens but {w.shape[0]} weights")
    n = len(toks) if length is None else int(length)
    m = np.zeros(len(toks), bool) if marked is None else np.asarray(marked, bool).reshape(-1)
    if m.shape[0] != len(toks):
        raise ValueError(f"marked has {m.shape[0]} entries for {len(toks)} tokens")
    return toks[:n], w[:n], m[:n]


def plot_text_attention(
    tokens: Tokens,
    weights,
    *,
    length: int | None = None,
    marked=None,
    title: str | None = None,
    cmap: str = "Reds",
    chars_per_line: int = 72,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Tokens as boxes coloured by their attention weight ``[S]`` (e.g. a classifier's pooling).

    Tokens past ``length`` (padding) are left out; ``marked`` ``[S]`` tokens (e.g. sentiment
    words) get a black frame.
    """
    toks, w, m = _text_inputs(tokens, weights, length, marked)
    norm = colors.Normalize(vmin=0.0, vmax=max(float(w.max(initial=0.0)), 1e-6))
    cm = colormaps[cmap]
    # Monospace layout in character units: deterministic, no renderer needed.
    lines, x, y = [], 0.0, 0
    for t in toks:
        width = len(_label(t, width=chars_per_line - 2))
        if x > 0 and x + width > chars_per_line:
            x, y = 0.0, y + 1
        lines.append((x, y, width))
        x += width + 1.0
    n_lines = y + 1
    fig_w = 10.0
    fontsize = fig_w * 0.82 * 72 / (chars_per_line * 0.602)
    fig = Figure(
        figsize=(fig_w, 0.9 + 0.36 * n_lines + (0.4 if title else 0)), layout="constrained"
    )
    ax, cax = fig.subplots(2, 1, height_ratios=[max(n_lines, 1) * 0.36, 0.12])
    ax.set_xlim(-0.5, chars_per_line + 0.5)
    ax.set_ylim(n_lines - 0.35, -0.65)
    ax.set_axis_off()
    for t, v, mk, (x0, y0, width) in zip(toks, w, m, lines, strict=True):
        face = cm(norm(v))
        ax.add_patch(
            Rectangle(
                (x0 - 0.3, y0 - 0.4),
                width + 0.6,
                0.8,
                facecolor=face,
                edgecolor="black" if mk else "none",
                linewidth=1.4,
            )
        )
        dark = colors.rgb_to_hsv(face[:3])[2] < 0.55 or norm(v) > 0.65
        ax.text(
            x0 + width / 2,
            y0,
            _label(t, width=chars_per_line - 2),
            ha="center",
            va="center",
            family="monospace",
            fontsize=fontsize,
            color="white" if dark else "black",
            fontweight="bold" if mk else "normal",
        )
    cbar = fig.colorbar(
        ScalarMappable(norm, cm),
        cax=cax,
        orientation="horizontal",
    )
    cbar.set_label(
        "attention weight" + ("   (framed: marked tokens)" if m.any() else ""), fontsize=8
    )
    cbar.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)


def text_attention_html(
    tokens: Tokens, weights, *, length: int | None = None, marked=None, cmap: str = "Reds"
) -> str:
    """The same as :func:`plot_text_attention` as an HTML fragment of coloured ``<span>``s."""
    toks, w, m = _text_inputs(tokens, weights, length, marked)
    norm = colors.Normalize(vmin=0.0, vmax=max(float(w.max(initial=0.0)), 1e-6))
    spans = []
    for t, v, mk in zip(toks, w, m, strict=True):
        face = colormaps[cmap](norm(v))
        fg = "#fff" if norm(v) > 0.65 else "#000"
        border = "border:1px solid #000;" if mk else ""
        spans.append(
            f'<span title="{v:.4f}" style="background:{colors.to_hex(face)};color:{fg};'
            f'{border}padding:1px 3px;margin:1px;border-radius:3px;font-family:monospace">'
            f"{html.escape(t)}</span>"
        )
    return '<div style="line-height:2">' + " ".join(spans) + "</div>"


# ----------------------------------------------------------------------------- curves

_NOT_METRICS = {"step", "epoch", "time", "wall_time", "elapsed", "elapsed_s", "timestamp", "seed"}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line, blank lines skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
                if isinstance(record, dict):
                    records.append(record)
    return records


def _series(records: Iterable[Mapping]) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for index, rec in enumerate(records):
        step = rec.get("step", index)
        split = rec.get("split") or rec.get("kind") or rec.get("phase")
        if split in ("meta", "config", "info"):  # run descriptions, not measurements
            continue
        for key, value in rec.items():
            if key in _NOT_METRICS or key in ("split", "kind", "phase"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            name = f"{split}/{key}" if split else key
            xs, ys = out.setdefault(name, ([], []))
            xs.append(step)
            ys.append(value)
    return out


def _is_loss(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in ("loss", "bpc", "bits", "perplexity", "nll", "mse"))


_RATE_WORDS = {
    "lr",
    "throughput",
    "sec",
    "s",
    "seconds",
    "time",
    "norm",
    "tokens",
    "examples",
    "per",
    "duration",
    "learning",
    "rate",
    "memory",
    "mem",
}


def _is_rate(name: str) -> bool:
    """Throughput, learning rate, timings, norms: not plotted unless asked for."""
    words = set(name.lower().replace("/", "_").replace("-", "_").split("_"))
    return bool(words & _RATE_WORDS)


def plot_training_curves(
    records: Iterable[Mapping] | str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Loss (left) and evaluation metrics (right) against step from metrics.jsonl records.

    ``records``: dicts with a ``step`` and numeric fields, or the path of a JSONL file. A
    ``split`` (or ``kind``/``phase``) field prefixes the names, e.g. ``eval/exact_match``.
    ``metrics`` picks series by name; by default every loss-like series goes left and the
    other metrics right (throughput, learning rate and timings are left out).
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_metrics(records)
    series = _series(records)
    if metrics is not None:
        missing = [m for m in metrics if m not in series]
        if missing:
            raise ValueError(f"no metric {missing} in the records; found: {sorted(series)}")
        chosen = {m: series[m] for m in metrics}
    else:
        chosen = {k: v for k, v in series.items() if _is_loss(k) or not _is_rate(k)}
    if not chosen:
        raise ValueError(f"no metrics to plot; found: {sorted(series) or 'no numeric fields'}")
    losses = {k: v for k, v in chosen.items() if _is_loss(k)}
    others = {k: v for k, v in chosen.items() if not _is_loss(k)}
    groups = [g for g in (losses, others) if g]
    fig = Figure(figsize=(5.2 * len(groups) + 0.6, 3.8), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        for name, (xs, ys) in sorted(group.items()):
            style = "-" if len(xs) > 20 else "-o"
            ax.plot(xs, ys, style, label=name, linewidth=1.4, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if group is losses else "metric")
        ax.grid(alpha=0.3)
        if len(group) > 3:  # below the axes, where it hides no curve
            ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
            )
        else:
            ax.legend(fontsize=8)
        if group is losses and all(y > 0 for _, ys in group.values() for y in ys):
            ys = [y for _, ys in group.values() for y in ys]
            if max(ys) / min(ys) > 30:
                ax.set_yscale("log")
    if title:
        fig.suptitle(_wrap(title, fig), fontsize=10)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- exports

PLOT_KINDS = ("heatmap", "grid", "rollout", "stats", "text", "curves")


def _model_order(paths: Sequence[str], kinds: Mapping[str, str]) -> list[str]:
    """Encoder layers first, layer numbers compared as numbers, self- before cross-attention
    within a block: model order for the usual layouts, whatever order the export lists."""

    def key(path: str):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        natural = tuple(
            (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", parent) if t
        )
        return (kinds[path] != "encoder", natural, kinds[path] == "cross", path)

    return sorted(paths, key=key)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "layer"


def plot_export(
    export,
    out_dir: str | os.PathLike,
    *,
    kinds: Sequence[str] = PLOT_KINDS,
    example: int = 0,
    layer: str | None = None,
    head: int | str = 0,
    fmt: str = "png",
    metrics: str | os.PathLike | None = None,
    strict: bool = False,
) -> tuple[list[Path], list[str]]:
    """Figures for an :class:`flaxattn.export.AttentionExport` (or the path of one).

    Returns ``(written paths, notes on figures that do not apply and were skipped)``; with
    ``strict`` a figure that does not apply raises ``ValueError`` instead. ``layer`` picks the
    heatmap/text layer (default: the last cross-attention layer, else the last layer); ``head``
    is an index or ``"mean"``.
    """
    from flaxattn.export import AttentionExport, load_attention

    if not isinstance(export, AttentionExport):
        export = load_attention(export)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
    unknown = [k for k in kinds if k not in PLOT_KINDS]
    if unknown:
        raise ValueError(f"unknown plot kind(s) {unknown}; use {PLOT_KINDS}")
    B = export.num_examples
    if not -B <= example < B:
        raise ValueError(f"example {example} out of range: the export has {B} examples")
    example %= B
    if layer is not None and layer not in export.kinds:
        raise ValueError(f"no layer {layer!r} in the export; layers: {list(export.paths)}")
    ordered = _model_order(export.paths, export.kinds)
    cross = [p for p in ordered if export.kinds[p] == "cross"]
    main = layer or (cross[-1] if cross else ordered[-1])
    out_dir = Path(out_dir)
    written, skipped = [], []
    task = export.meta.get("task") or "attention"
    step = export.meta.get("step")
    tag = f"{task}" + (f", step {step}" if step is not None else "")

    def skip(why: str):
        if strict:
            raise ValueError(why)
        skipped.append(why)

    def one(path: str):
        w = export.layers[path][example]  # [N, T, S]
        qt, kt = export.tokens(path)
        ql, kl = export.lengths(path)
        return w, qt[example], kt[example], int(ql[example]), int(kl[example])

    if "heatmap" in kinds:
        w, qt, kt, ql, kl = one(main)
        heads = export.heads[main]
        if head == "mean":
            mat, name = w.mean(0), "mean of heads"
        else:
            h = int(head)
            if not -w.shape[0] <= h < w.shape[0]:
                raise ValueError(f"head {h} out of range: layer {main!r} has {w.shape[0]} heads")
            mat, name = w[h], f"head {int(heads[h])}"
        ttl = f"{main} ({export.kinds[main]}), {name}, example {example} — {tag}"
        fig = plot_heatmap(mat, qt, kt, query_length=ql, key_length=kl, title=ttl)
        written.append(
            save_figure(
                fig, out_dir / f"heatmap_{_slug(main)}_{_slug(str(head))}_ex{example}.{fmt}"
            )
        )

    if "grid" in kinds:
        paths = [layer] if layer else ordered
        layers, lengths, tokens = {}, {}, {}
        for p in paths:
            w, qt, kt, ql, kl = one(p)
            layers[f"{p} ({export.kinds[p]})"] = w
            lengths[f"{p} ({export.kinds[p]})"] = (ql, kl)
            tokens[f"{p} ({export.kinds[p]})"] = (qt, kt)
        fig = plot_attention_grid(
            layers,
            lengths=lengths,
            tokens=tokens,
            title=f"all layers and heads, example {example} — {tag}",
        )
        written.append(save_figure(fig, out_dir / f"grid_ex{example}.{fmt}"))

    if "rollout" in kinds:
        stack_kind = "self" if any(export.kinds[p] == "self" for p in ordered) else "encoder"
        stack = [p for p in ordered if export.kinds[p] == stack_kind]
        if not stack:
            skip("rollout: the export has no self-attention layers")
        else:
            ws = [export.layers[p][example : example + 1] for p in stack]
            qt = export.tokens(stack[0])[0][example]
            n = int(export.lengths(stack[0])[0][example])
            ws = [np.where(np.arange(w.shape[-1]) < n, w, 0.0) for w in ws]
            roll = analysis.attention_rollout(ws)[0]
            fig = plot_rollout(
                roll,
                qt,
                length=n,
                title=f"attention rollout over {len(stack)} {stack_kind} layers, "
                f"example {example} — {tag}",
            )
            written.append(save_figure(fig, out_dir / f"rollout_{stack_kind}_ex{example}.{fmt}"))

    if "stats" in kinds:
        layers = {p: export.layers[p] for p in ordered}
        lengths = {p: export.lengths(p) for p in ordered}
        stats = analysis.layer_head_stats(layers, lengths, unit="bits")
        names = [f"{p} ({export.kinds[p]})" for p in ordered]
        fig = plot_head_stats(
            stats, names, unit="bits", title=f"per-head statistics over {B} examples — {tag}"
        )
        written.append(save_figure(fig, out_dir / f"head_stats.{fmt}"))

    if "text" in kinds:
        w, qt, kt, ql, kl = one(main)
        valid_rows = max(ql, 1)
        pooled = w[:, :valid_rows].mean(axis=(0, 1))  # mean over heads and valid queries
        marked = export.extras.get("marked")
        if marked is not None and marked.shape[:2] == (B, kt.shape[0]):
            marked = marked[example]
        else:
            marked = None
        label = []
        for key in ("label", "prediction"):
            if key in export.extras and export.extras[key].shape[:1] == (B,):
                label.append(f"{key} {export.extras[key][example]}")
        ttl = (
            f"{main}: attention per token, example {example}"
            + (f" ({', '.join(label)})" if label else "")
            + f" — {tag}"
        )
        fig = plot_text_attention(kt, pooled, length=kl, marked=marked, title=ttl)
        written.append(save_figure(fig, out_dir / f"text_{_slug(main)}_ex{example}.{fmt}"))

    if "curves" in kinds:
        if metrics is None:
            skip("curves: no metrics file (pass metrics=...)")
        else:
            fig = plot_training_curves(metrics, title=f"training — {task}")
            written.append(save_figure(fig, out_dir / f"curves.{fmt}"))
    return written, skipped
