"""Figures of image exports (format version 2): attention over the image.

- :func:`plot_vit_attention`: per layer, the class token's attention of every head and the
  rollout up to that layer, each upsampled onto the image of one example.
- :func:`plot_spatial_maps`: CBAM spatial maps over the images of several examples.
- :func:`plot_channel_weights`: SE / CBAM channel weights averaged per class.
- :func:`plot_image_examples`: a grid of examples with their main map, box, label, prediction.
- :func:`plot_vision`: every one of them that applies to an export.

Boxes are drawn as green rectangles; maps are drawn over the grey image with transparency.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from flaxattn import analysis
from flaxattn.viz._plots import save_figure


def _load(export: Any):
    from flaxattn.export import AttentionExport, load_attention

    export = export if isinstance(export, AttentionExport) else load_attention(export)
    if export.image is None:
        raise ValueError("the export holds no images (format version 2 image/pixels)")
    return export


def _gray(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else pixels.mean(-1)


def _overlay(ax, pixels: np.ndarray, m: np.ndarray | None, box, title: str = "") -> None:
    """The image in grey, ``m`` (any resolution dividing the image) over it, and the box."""
    img = _gray(pixels)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if m is not None:
        up = analysis.upsample_map(m[None], img.shape)[0]
        ax.imshow(up, cmap="inferno", alpha=0.6, interpolation="nearest")
    if box is not None:
        t, lft, b, r = (int(v) for v in box)
        ax.add_patch(Rectangle((lft - 0.5, t - 0.5), r - lft, b - t, fill=False,
                               edgecolor="lime", linewidth=1.2))  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _box(export, i: int):
    return None if export.image.box is None else export.image.box[i]


def _labels(export, i: int) -> str:
    e = export.extras
    if "label" in e and "prediction" in e:
        return f"label {int(e['label'][i])}, pred {int(e['prediction'][i])}"
    return ""


def vit_maps(export) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({layer: [B, N, rows, cols]} class-token attention, rollout [L, B, rows, cols])``."""
    img = export.image
    grid, prefix = tuple(int(v) for v in img.grid), int(img.prefix)
    cls = {p: analysis.patch_map(export.layers[p][:, :, 0, :], grid, prefix) for p in export.paths}
    rollout = analysis.rollout_maps([export.layers[p] for p in export.paths], grid=grid,
                                    prefix=prefix)  # fmt: skip
    return cls, rollout


def plot_vit_attention(export, path=None, *, example: int = 0) -> Figure:
    """Rows: layers; columns: the image, each head's class-token attention, the rollout."""
    export = _load(export)
    if export.image.grid is None or not export.paths:
        raise ValueError("plot_vit_attention needs a transformer export with image/grid")
    cls, rollout = vit_maps(export)
    L, N = len(export.paths), cls[export.paths[0]].shape[1]
    fig = Figure(figsize=(1.6 * (N + 2), 1.7 * L + 0.4), layout="constrained")
    axes = fig.subplots(L, N + 2, squeeze=False)
    pixels, box = export.image.pixels[example], _box(export, example)
    for li, p in enumerate(export.paths):
        _overlay(axes[li, 0], pixels, None, box, f"{p}\n{_labels(export, example)}")
        for h in range(N):
            _overlay(axes[li, h + 1], pixels, cls[p][example, h], box, f"cls attn, head {h}")
        _overlay(axes[li, N + 1], pixels, rollout[li, example], box, f"rollout to layer {li}")
    fig.suptitle(f"{export.meta.get('task', '')}: class-token attention, example {example}",
                 fontsize=9)  # fmt: skip
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_spatial_maps(export, path=None, *, examples: int = 6) -> Figure:
    """Rows: CBAM blocks; columns: examples, each spatial map over its image."""
    export = _load(export)
    if not export.spatial:
        raise ValueError("the export holds no spatial maps")
    n = min(examples, export.num_examples)
    paths = list(export.spatial)
    fig = Figure(figsize=(1.6 * n, 1.7 * len(paths) + 0.4), layout="constrained")
    axes = fig.subplots(len(paths), n, squeeze=False)
    for r, p in enumerate(paths):
        for i in range(n):
            _overlay(axes[r, i], export.image.pixels[i], export.spatial[p][i], _box(export, i),
                     f"{p}\n{_labels(export, i)}")  # fmt: skip
    fig.suptitle(f"{export.meta.get('task', '')}: CBAM spatial attention", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_channel_weights(export, path=None) -> Figure:
    """One heatmap per block: mean channel weight (columns) of the examples of each class (rows)."""
    export = _load(export)
    if not export.channel:
        raise ValueError("the export holds no channel weights")
    labels = export.extras.get("label")
    labels = np.zeros(export.num_examples, int) if labels is None else np.asarray(labels)
    classes = np.unique(labels)
    paths = list(export.channel)
    fig = Figure(figsize=(7, 1.0 + 0.3 * len(classes) * len(paths)), layout="constrained")
    axes = fig.subplots(len(paths), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, paths, strict=True):
        w = export.channel[p]
        per_class = np.stack([w[labels == c].mean(0) for c in classes])
        im = ax.imshow(per_class, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
        ax.set_ylabel("class", fontsize=8)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_title(f"{p}: mean channel weight per class", fontsize=8)
        fig.colorbar(im, ax=ax)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_image_examples(export, path=None, *, examples: int = 16) -> Figure:
    """A grid of examples with their main map: the last layer's rollout (ViT) or the last
    spatial map (CBAM); without either, the image alone."""
    export = _load(export)
    n = min(examples, export.num_examples)
    if export.paths and export.image.grid is not None:
        maps, what = vit_maps(export)[1][-1], "rollout, last layer"
    elif export.spatial:
        last = list(export.spatial)[-1]
        maps, what = export.spatial[last], f"spatial map {last}"
    else:
        maps, what = None, "images"
    cols = min(n, 8)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.5 * cols, 1.7 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        _overlay(ax, export.image.pixels[i], None if maps is None else maps[i], _box(export, i),
                 _labels(export, i))  # fmt: skip
    fig.suptitle(f"{export.meta.get('task', '')}: examples ({what})", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_vision(export, out_dir: str | os.PathLike) -> list[Path]:
    """Every image figure that applies to ``export``, written under ``out_dir``."""
    export = _load(export)
    out = Path(out_dir)
    written = [out / "image_examples.png"]
    plot_image_examples(export, written[-1])
    if export.paths and export.image.grid is not None:
        written.append(out / "vit_attention.png")
        plot_vit_attention(export, written[-1])
    if export.spatial:
        written.append(out / "spatial_maps.png")
        plot_spatial_maps(export, written[-1])
    if export.channel:
        written.append(out / "channel_weights.png")
        plot_channel_weights(export, written[-1])
    return written
