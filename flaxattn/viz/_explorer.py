"""The interactive attention explorer: one self-contained, offline HTML page per export.

The page holds its JavaScript, CSS and data inline and makes no request of any kind (a
Content-Security-Policy of ``default-src 'none'`` forbids them), so it works from ``file://``,
in a notebook and offline. Views: model (every layer x head as a thumbnail), head (bertviz-style
lines, opacity = weight), matrix (one head's heatmap, exact values on hover), statistics
(entropy, mean distance and sink mass per layer x head, from :mod:`flaxattn.analysis`), text
(tokens coloured by attention, marked tokens framed) and, for exports with image fields, image
(attention over the image). A rollout toggle shows attention rollout wherever the export has a
stack of self-attention layers. Example, layer and head selectors, arrow keys and the URL
fragment (``#view=matrix&example=2&layer=...&head=3``) choose and restore what is shown.

Weights are embedded as quantised codes (see :mod:`flaxattn.viz._explorer_data`): 16 bits
(error at most ``1/131070``) for exports of up to ``2**21`` weights, 8 bits (error at most
``1/510``) above that, or as chosen with ``bits=``. Statistics and rollout are computed here
from the exact weights. Cells are *masked* (grey, hatched) outside the valid lengths and, for a
self-attention layer whose weights above the diagonal are all exactly zero, above the diagonal
(causal); cells a top-k export did not store are *not stored* (white, dotted).

Axis letters as in :mod:`flaxattn`: B examples, N heads, T queries, S keys, L layers; k is the
number of weights a top-k layer keeps per row.
"""

from __future__ import annotations

import contextlib
import fnmatch
import html
import json
import os
import re
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, colors

from flaxattn import analysis
from flaxattn.viz._explorer_data import choose_bits, encode_codes, quantise
from flaxattn.viz._plots import MASKED_COLOR, _model_order

__all__ = ["EXPLORER_VIEWS", "Explorer", "explore", "explorer_html", "save_explorer"]

EXPLORER_VIEWS = ("model", "head", "matrix", "stats", "text", "image")
# The page's scripts, in the order they run (each adds to the window.FlaxAttn namespace).
_SCRIPTS = (
    "data.js",
    "colors.js",
    "model_view.js",
    "head_view.js",
    "matrix_view.js",
    "stats_view.js",
    "text_view.js",
    "image_view.js",
    "app.js",
)
# Overlaid heads: Okabe & Ito's colour-blind-safe palette, with its yellow (too faint on white)
# replaced by Paul Tol's wine.
HEAD_COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
               "#882255")  # fmt: skip


def _resource(name: str) -> str:
    return resources.files("flaxattn.viz").joinpath("explorer", name).read_text("utf-8")


def _lut(cmap: str) -> str:
    """A 256-entry colour table as one string of hex triplets (what the page interpolates)."""
    try:
        cm = colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    return "".join(colors.to_hex(c)[1:] for c in cm(np.linspace(0.0, 1.0, 256)))


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its <script> element early: <, > and & are escaped."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(a) -> list:
    """A float array as nested lists, rounded to 6 decimals, None for NaN (JSON has no NaN)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim > 1:
        return [_finite(x) for x in a]
    return [round(float(x), 6) if np.isfinite(x) else None for x in a]


def _select_paths(export, layers) -> list[str]:
    ordered = _model_order(export.paths, export.kinds)
    if layers is None:
        return ordered
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = [p for p in ordered if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"layers {layers!r} select no layer; layers: {ordered}")
    return chosen


def _is_causal(w: np.ndarray, ql: np.ndarray, kl: np.ndarray) -> bool:
    """True when every valid cell above the diagonal of ``w [B, N, T, T]`` is exactly 0."""
    B, _, T, S = w.shape
    if T != S or T < 2:
        return False
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    upper = (j > i)[None] & (i[None] < ql[:, None, None]) & (j[None] < kl[:, None, None])
    return bool(not np.any(w[np.broadcast_to(upper[:, None], w.shape)]))


def _layer_entry(export, path: str, bits: int, causal: bool) -> dict[str, Any]:
    kind = export.kinds[path]
    qt, kt = export.tokens(path)
    entry: dict[str, Any] = {
        "path": path,
        "kind": kind,
        "heads": [int(h) for h in np.asarray(export.heads[path]).reshape(-1)],
        "T": int(qt.shape[1]),
        "S": int(kt.shape[1]),
        "causal": causal,
        "topk": None,
    }
    if export.is_topk(path):
        values, indices = export.topk_values[path], export.topk_indices[path]
        q = quantise(values, bits, name=f"layer {path!r}")
        entry["topk"] = int(values.shape[-1])
        wide = entry["S"] >= 2**16
        entry["indices"] = encode_codes(indices.astype(np.uint32 if wide else np.uint16))
        entry["indexBits"] = 32 if wide else 16
    else:
        q = quantise(export.dense[path], bits, name=f"layer {path!r}")
    entry.update(lo=q.lo, hi=q.hi, bits=q.bits, maxError=q.max_error, codes=encode_codes(q.codes))
    return entry


def _rollouts(export, paths: list[str], entries: list[dict], bits: int) -> list[dict]:
    """Rollout up to each layer of every self-attention stack (``encoder`` and ``self``)."""
    out = []
    for kind in ("encoder", "self"):
        stack = [i for i, p in enumerate(paths) if export.kinds[p] == kind]
        if not stack:
            continue
        first = paths[stack[0]]
        ql = np.asarray(export.lengths(first)[0])
        T = entries[stack[0]]["T"]
        keep = (np.arange(T)[None, :] < ql[:, None])[:, None, None, :]  # [B, 1, 1, T]
        ws = [np.where(keep, export.layers[paths[i]], 0.0) for i in stack]
        roll = analysis.attention_rollout(ws, return_all=True)  # [L, B, T, T]
        q = quantise(roll, bits, name=f"the {kind} rollout")
        out.append({
            "kind": kind,
            "layers": stack,
            "causal": all(entries[i]["causal"] for i in stack),
            "lo": q.lo, "hi": q.hi, "bits": q.bits, "maxError": q.max_error,
            "codes": encode_codes(q.codes),
        })  # fmt: skip
    return out


def _stats(export, paths: list[str]) -> dict[str, Any]:
    """Entropy (bits), mean distance and sink mass: over all examples ``[L, N]`` and per
    example ``[B, L, N]`` (None where a layer has fewer heads or no valid row)."""
    if not paths:
        empty = {k: [] for k in ("entropy", "distance", "sink")}
        return {"unit": "bits", "all": empty,
                "perExample": {k: [[]] * export.num_examples for k in empty}}  # fmt: skip
    layers = {p: export.layers[p] for p in paths}
    lengths = {p: export.lengths(p) for p in paths}
    overall = analysis.layer_head_stats(layers, lengths, unit="bits")
    B, L = export.num_examples, len(paths)
    n_max = overall["entropy"].shape[1]
    per = {k: np.full((B, L, n_max), np.nan) for k in overall}
    for i, p in enumerate(paths):
        ql, kl = lengths[p]
        kw = dict(query_lengths=ql, key_lengths=kl, per_example=True)
        n = layers[p].shape[1]
        per["entropy"][:, i, :n] = analysis.head_entropy(layers[p], unit="bits", **kw)
        per["distance"][:, i, :n] = analysis.mean_attention_distance(layers[p], **kw)
        per["sink"][:, i, :n] = analysis.sink_mass(layers[p], **kw)
    return {
        "unit": "bits",
        "all": {k: _finite(v) for k, v in overall.items()},
        "perExample": {k: _finite(v) for k, v in per.items()},
    }


def _extras(export) -> dict[str, Any]:
    """Per-example scalars (label, prediction, ...) and boolean token marks the page shows."""
    B = export.num_examples
    scalars, marks = {}, {}
    for name, v in export.extras.items():
        v = np.asarray(v)
        if v.shape == (B,) and v.dtype.kind in "biufU":
            scalars[name] = [x.item() if v.dtype.kind != "f" else round(float(x), 6) for x in v]
        elif v.ndim == 2 and v.shape[0] == B and v.dtype == bool:
            marks[name] = v.astype(int).tolist()
    return {"scalars": scalars, "marks": marks}


def _image(export) -> dict[str, Any] | None:
    """The version-2 image entries: 8-bit pixels (error at most 1/510), the box and patch
    geometry, spatial maps (quantised like weights) and channel weights (as numbers)."""
    image = getattr(export, "image", None)
    spatial = getattr(export, "spatial", None) or {}
    channel = getattr(export, "channel", None) or {}
    if image is None and not spatial and not channel:
        return None
    out: dict[str, Any] = {"pixels": None, "spatial": [], "channel": []}
    if image is not None:
        pixels = np.asarray(image.pixels, dtype=np.float32)
        if pixels.ndim == 3:
            pixels = pixels[..., None]  # [B, Hi, Wi, 1]
        q = quantise(pixels, 8, name="image pixels")
        out.update(
            pixels=encode_codes(q.codes),
            shape=[int(x) for x in pixels.shape[1:]],  # Hi, Wi, C
            pixelLo=q.lo, pixelHi=q.hi,
            box=None if image.box is None else np.asarray(image.box).astype(int).tolist(),
            grid=None if image.grid is None else [int(x) for x in image.grid],
            patch=None if image.patch is None else [int(x) for x in image.patch],
            prefix=int(image.prefix),
        )  # fmt: skip
    for path, maps in spatial.items():
        q = quantise(maps, 16, name=f"spatial map {path!r}")
        out["spatial"].append({
            "path": path, "shape": [int(x) for x in maps.shape[1:]], "lo": q.lo, "hi": q.hi,
            "bits": 16, "maxError": q.max_error, "codes": encode_codes(q.codes),
        })  # fmt: skip
    for path, values in channel.items():
        out["channel"].append({"path": path, "values": _finite(values)})
    return out


def _head_position(entry: dict, head: int | str, what: str = "head") -> int:
    if head == "mean":
        return -1
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)):
        raise TypeError(f"{what} must be a head number or 'mean', got {head!r}")
    if int(head) not in entry["heads"]:
        raise ValueError(
            f"{what} {head} is not in layer {entry['path']!r}, whose heads are {entry['heads']}"
        )
    return entry["heads"].index(int(head))


def _payload(export, *, view, example, layer, head, layers, bits, cmap, text_cmap, title):
    image = _image(export)
    if view is None:
        view = "model" if export.paths else "image"
    if view not in EXPLORER_VIEWS:
        raise ValueError(f"view must be one of {EXPLORER_VIEWS}, got {view!r}")
    if view == "image" and image is None:
        raise ValueError("view 'image' needs an export with image fields; this one has none")
    if view != "image" and not export.paths:
        raise ValueError(f"view {view!r} needs attention layers; this export has only image maps")
    B = export.num_examples
    if isinstance(example, bool) or not isinstance(example, (int, np.integer)):
        raise TypeError(f"example must be an integer, got {example!r}")
    if not -B <= example < B:
        raise ValueError(f"example must be in [0, {B}) for this export, got {example}")
    paths = _select_paths(export, layers)
    if layer is not None and layer not in export.kinds:
        raise ValueError(f"no layer {layer!r} in the export; layers: {list(export.paths)}")
    if layer is not None and layer not in paths:
        raise ValueError(f"layer {layer!r} is not among the layers selected by {layers!r}")
    cells = sum(
        int(np.prod((export.topk_values if export.is_topk(p) else export.dense)[p].shape))
        for p in paths
    )
    bits = choose_bits(bits, cells)
    entries = []
    for p in paths:
        ql, kl = (np.asarray(x) for x in export.lengths(p))
        causal = export.kinds[p] != "cross" and _is_causal(export.layers[p], ql, kl)
        entries.append(_layer_entry(export, p, bits, causal))
    cross = [i for i, p in enumerate(paths) if export.kinds[p] == "cross"]
    layer_index = paths.index(layer) if layer is not None else (cross or [len(paths) - 1])[-1]
    head_pos = _head_position(entries[layer_index], head) if entries else 0
    meta = export.meta
    task = meta.get("task") or "attention"
    return {
        "title": title or f"{task}: attention explorer",
        "meta": {k: meta.get(k) for k in ("task", "step", "created", "flaxattn_version")}
        | {"bounded": meta.get("bounded")},
        "examples": B,
        "tokens": {
            "query": export.query_tokens.tolist(),
            "key": None if export.key_tokens is None else export.key_tokens.tolist(),
        },
        "lengths": {
            "query": [int(x) for x in export.query_lengths],
            "key": None if export.key_lengths is None else [int(x) for x in export.key_lengths],
        },
        "layers": entries,
        "rollouts": _rollouts(export, paths, entries, bits),
        "stats": _stats(export, paths),
        "extras": _extras(export),
        "image": image,
        "colormap": _lut(cmap),
        "textColormap": _lut(text_cmap),
        "headColors": list(HEAD_COLORS),
        "maskedColor": MASKED_COLOR,
        "initial": {
            "view": view,
            "example": int(example) % B,
            "layer": layer_index,
            "head": head_pos,
            # A ViT's class token (prefix >= 1) is the query the image view starts with.
            "query": 0 if image and image.get("grid") and image["prefix"] else -1,
        },
    }


def _as_export(export):
    from flaxattn.export import AttentionExport, load_attention

    if isinstance(export, AttentionExport):
        return export
    if isinstance(export, (str, os.PathLike)):
        return load_attention(export)
    raise TypeError(f"export must be an AttentionExport or a path, got {type(export).__name__}")


def explorer_html(
    export,
    *,
    view: str | None = None,
    example: int = 0,
    layer: str | None = None,
    head: int | str = 0,
    layers: str | Iterable[str] | None = None,
    bits: int | None = None,
    cmap: str = "viridis",
    text_cmap: str = "Reds",
    title: str | None = None,
) -> str:
    """The explorer page of an export, as one self-contained HTML string.

    Args:
      export: an :class:`flaxattn.export.AttentionExport` or the path of an ``.npz`` export.
      view: the view the page opens with, one of ``EXPLORER_VIEWS`` (the URL fragment can
        choose another); default: ``"model"``, or ``"image"`` for an export of image maps only.
      example: the example shown first, in ``[0, B)``.
      layer: the layer path shown first (default: the last cross-attention layer, else the
        last layer).
      head: the head number shown first (as stored in ``heads/<path>``), or ``"mean"``.
      layers: glob pattern(s) of the layer paths to include (default: all), e.g. to keep a
        page small.
      bits: 8 or 16 bits per weight, or None for 16 up to ``2**21`` weights and 8 above.
      cmap: matplotlib colormap of heatmaps and thumbnails (viridis: colour-blind safe).
      text_cmap: colormap of the text view's token backgrounds.
      title: the page title (default: ``"<task>: attention explorer"``).

    Returns:
      The HTML page (UTF-8 text, no external reference).
    """
    export = _as_export(export)
    data = _payload(
        export, view=view, example=example, layer=layer, head=head, layers=layers, bits=bits,
        cmap=cmap, text_cmap=text_cmap, title=title,
    )  # fmt: skip
    scripts = "\n".join(
        f"<script>\n/* {name} */\n{_resource(name)}\n</script>" for name in _SCRIPTS
    )
    parts = {
        "TITLE": html.escape(data["title"]),
        "CSS": _resource("explorer.css"),
        "DATA": _json_for_script(data),
        "SCRIPTS": scripts,
    }
    # One pass, so a placeholder inside the data (a token "{{CSS}}") is left as it is.
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _resource("page.html"))


def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_explorer(export, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`explorer_html` of ``export`` to ``path`` atomically; return the path.

    ``kwargs`` are those of :func:`explorer_html`.
    """
    return _atomic_write_text(Path(path), explorer_html(export, **kwargs))


class Explorer:
    """The explorer page of an export, shown inline by notebooks (``_repr_html_``).

    The page runs in an ``<iframe srcdoc>``, so its scripts and styles stay apart from the
    notebook's and several explorers can be shown at once.
    """

    def __init__(self, page: str, height: int = 760):
        self.html = page
        self.height = int(height)

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
            f'style="width:100%;height:{self.height}px;border:1px solid #ccc" '
            'title="flaxattn attention explorer"></iframe>'
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` atomically."""
        return _atomic_write_text(Path(path), self.html)


def explore(export, *, height: int = 760, **kwargs: Any) -> Explorer:
    """The explorer of ``export`` for a notebook: ``explore("runs/reverse/attention.npz")``.

    ``kwargs`` are those of :func:`explorer_html`; ``height`` is the frame's height in pixels.
    """
    return Explorer(explorer_html(export, **kwargs), height=height)
