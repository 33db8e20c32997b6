"""flaxattn.viz: every plot function writes a non-empty figure that matplotlib reads back."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flaxattn import analysis, viz
from flaxattn.export import save_attention


def _check_png(path):
    assert path.exists() and path.stat().st_size > 0
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def attn():
    rng = np.random.default_rng(0)
    T = 9
    logits = rng.normal(size=(2, 2, T, T)) + 6 * np.eye(T)[::-1]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_heatmap_png_pdf_svg(tmp_path, attn):
    tokens = list("abcdefghi")
    for ext in ("png", "pdf", "svg"):
        fig = viz.plot_heatmap(
            attn[0, 0],
            tokens,
            tokens[::-1],
            query_length=7,
            key_length=6,
            title="head 0",
            path=tmp_path / f"h.{ext}",
        )
        assert isinstance(fig, Figure)
        assert (tmp_path / f"h.{ext}").stat().st_size > 0
    _check_png(tmp_path / "h.png")
    assert (tmp_path / "h.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "h.svg").read_bytes()[:2000]
    viz.save_figure(fig, tmp_path / "noext")
    _check_png(tmp_path / "noext.png")
    with pytest.raises(ValueError, match="format"):
        viz.save_figure(fig, tmp_path / "h.jpgx")


def test_masked_cells_differ_from_zero_weight():
    w = np.array([[0.0, 1.0], [0.0, 1.0]])  # cell (0, 0) is a real zero, (1, 0) is masked
    mask = np.array([[True, True], [False, True]])
    fig = viz.plot_heatmap(w, mask=mask, annotate=False)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())[..., :3].astype(float)
    ax = fig.axes[0]

    def colour(i, j):
        x, y = ax.transData.transform((j, i))
        r, c = int(rgba.shape[0] - y), int(x)
        return rgba[r - 4 : r + 5, c - 4 : c + 5].reshape(-1, 3).mean(0)

    zero, masked = colour(0, 0), colour(1, 0)
    assert np.abs(zero - masked).max() > 60, (zero, masked)
    assert masked.mean() > 150  # light grey with hatching, not the colormap's dark zero


def test_long_sequence_labels_are_thinned(attn):
    T = 130
    w = np.full((T, T), 1.0 / T)
    fig = viz.plot_heatmap(w, [f"t{i}" for i in range(T)], [f"t{i}" for i in range(T)])
    ax = fig.axes[0]
    assert 0 < len(ax.get_xticks()) <= viz.MAX_LABELS
    assert fig.get_figwidth() <= 16 and fig.get_figheight() <= 14


def test_grid_rollout_stats_text_curves(tmp_path, attn):
    layers = {"enc/0": attn[0], "enc/1": attn[1]}
    lengths = {"enc/0": (7, 7), "enc/1": (9, 9)}
    tokens = {k: (list("abcdefghi"),) * 2 for k in layers}
    viz.plot_attention_grid(
        layers, lengths=lengths, tokens=tokens, title="grid", path=tmp_path / "grid.png"
    )
    _check_png(tmp_path / "grid.png")

    roll = analysis.attention_rollout([attn[:1], attn[1:]])[0]
    viz.plot_rollout(roll, list("abcdefghi"), length=8, path=tmp_path / "rollout.png")
    _check_png(tmp_path / "rollout.png")
    viz.plot_rollout(roll, None, query_index=-1, path=tmp_path / "rollout_row.png")
    _check_png(tmp_path / "rollout_row.png")

    stats = analysis.layer_head_stats({"a": attn, "b": attn[:, :1]})
    viz.plot_head_stats(stats, ["a", "b"], path=tmp_path / "stats.png")
    _check_png(tmp_path / "stats.png")

    words = ["this", "movie", "was", "not", "very", "good", "at", "all", "really"]
    pooled = attn[0, 0, 0]
    marked = [w in ("good", "not") for w in words]
    viz.plot_text_attention(
        words, pooled, marked=marked, length=8, title="negative", path=tmp_path / "text.png"
    )
    _check_png(tmp_path / "text.png")
    html = viz.text_attention_html(["<b>", "&"] + words[2:], pooled, marked=marked)
    assert "&lt;b&gt;" in html and "&amp;" in html and html.count("<span") == 9

    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("w") as f:
        for step in range(0, 200, 10):
            f.write(json.dumps({"step": step, "loss": 2.0 / (1 + step), "lr": 1e-3}) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"step": step, "split": "eval", "accuracy": step / 200}) + "\n")
        f.write("\n")
    fig = viz.plot_training_curves(metrics, path=tmp_path / "curves.png")
    _check_png(tmp_path / "curves.png")
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert labels == ["loss", "eval/accuracy"]  # the learning rate is left out
    with pytest.raises(ValueError, match="no metric"):
        viz.plot_training_curves(metrics, metrics=["bleu"])
    metrics.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2:"):
        viz.read_metrics(metrics)


def test_plot_export_writes_every_figure(tmp_path, attn):
    B, T = 2, 9
    cross = attn[:, :, :5]
    path = save_attention(
        tmp_path / "a.npz",
        layers={"decoder/0/self": attn[:, :, :5, :5], "decoder/0/cross": cross},
        kinds={"decoder/0/self": "self", "decoder/0/cross": "cross"},
        query_tokens=[list("abcde")] * B,
        key_tokens=[list("vwxyzstuv")] * B,
        query_lengths=[5, 4],
        key_lengths=[9, 7],
        meta={"task": "reverse", "step": 3},
        extras={"marked": np.zeros((B, T), bool), "label": np.array([0, 1])},
    )
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    written, skipped = viz.plot_export(path, tmp_path / "figs", example=1, metrics=metrics)
    assert skipped == []
    assert {p.name.split("_")[0].split(".")[0] for p in written} == {
        "heatmap",
        "grid",
        "rollout",
        "head",
        "text",
        "curves",
    }
    for p in written:
        _check_png(p)
    with pytest.raises(ValueError, match="example 5"):
        viz.plot_export(path, tmp_path / "figs", example=5)
