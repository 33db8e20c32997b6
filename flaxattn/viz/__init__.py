"""Matplotlib figures of attention: heatmaps, layer x head grids, rollout, per-head statistics,
text coloured by attention, training curves, ``[L, N]`` head tables of :mod:`flaxattn.interp`
(ablation, patching) and scores over training steps; and the interactive explorer, one offline
HTML page per export (:func:`explorer_html`, :func:`save_explorer`, :func:`explore`).

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` and, given ``path``, also
writes it there atomically (a temporary file, then ``os.replace``): PNG by default, PDF or SVG
when the path ends in ``.pdf`` / ``.svg``. Figures are built with ``matplotlib.figure.Figure``
(not pyplot), so this module neither selects a backend nor keeps figures alive; it works the
same in scripts, on headless machines and in notebooks (where a returned Figure displays).

Cells that are masked (padding, or ``False`` in a given mask) are drawn grey and hatched, so
they are never confused with a weight of zero. Past about 40 tokens only every k-th token label
is shown.
"""

from flaxattn.viz._explorer import (
    EXPLORER_VIEWS,
    Explorer,
    explore,
    explorer_html,
    save_explorer,
)
from flaxattn.viz._interp import (
    plot_head_table,
    plot_head_tables,
    plot_patching,
    plot_scores_over_steps,
)
from flaxattn.viz._plots import (
    FORMATS,
    MASKED_COLOR,
    MAX_LABELS,
    PLOT_KINDS,
    plot_attention_grid,
    plot_export,
    plot_head_stats,
    plot_heatmap,
    plot_rollout,
    plot_text_attention,
    plot_training_curves,
    read_metrics,
    save_figure,
    text_attention_html,
)
from flaxattn.viz._vision import (
    plot_channel_weights,
    plot_image_examples,
    plot_spatial_maps,
    plot_vision,
    plot_vit_attention,
)

__all__ = [
    "plot_vit_attention",
    "plot_vision",
    "plot_spatial_maps",
    "plot_image_examples",
    "plot_channel_weights",
    "EXPLORER_VIEWS",
    "Explorer",
    "FORMATS",
    "MASKED_COLOR",
    "MAX_LABELS",
    "PLOT_KINDS",
    "explore",
    "explorer_html",
    "plot_attention_grid",
    "plot_export",
    "plot_head_stats",
    "plot_head_table",
    "plot_head_tables",
    "plot_heatmap",
    "plot_patching",
    "plot_rollout",
    "plot_scores_over_steps",
    "plot_text_attention",
    "plot_training_curves",
    "read_metrics",
    "save_explorer",
    "save_figure",
    "text_attention_html",
]
