"""flaxattn.viz figures of interp results: every plot writes a non-empty figure."""

from __future__ import annotations

import numpy as np
import pytest

from flaxattn import viz


def table(seed: int, shape=(2, 4)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 5.0, shape)


def test_head_table_writes_a_png_with_one_text_per_cell(tmp_path):
    values = table(0)
    values[1, 3] = np.nan  # drawn hatched, not written
    fig = viz.plot_head_table(values, ["layer a", "layer b"], title="ablation",
                              path=tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 7 and f"{values[0, 0]:.2f}" in texts


def test_head_tables_and_patching_write_one_panel_per_table(tmp_path):
    fig = viz.plot_head_tables({"zero": table(1), "mean": table(2)}, path=tmp_path / "a.svg")
    assert (tmp_path / "a.svg").stat().st_size > 1000
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    recovered = {"first shuffled": table(3) / 5, "repeat shuffled": 1 - table(4) / 5}
    viz.plot_patching(recovered, ["l0", "l1"], title="patching", path=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_scores_over_steps_writes_a_figure_with_the_marked_step(tmp_path):
    steps = np.arange(0, 500, 25)
    rise = 1 / (1 + np.exp(-(steps - 250) / 20))
    fig = viz.plot_scores_over_steps(
        steps, {"L1H1 induction": rise}, {"first": 4 + 0 * rise, "repeat": 4 - 3.8 * rise},
        mark_step=250, path=tmp_path / "phase.png")
    assert (tmp_path / "phase.png").stat().st_size > 1000
    assert any(line.get_xdata()[0] == 250 for line in fig.axes[0].lines[1:])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: viz.plot_head_table(np.ones(3)), r"\[L, N\]"),
        (lambda: viz.plot_head_tables({}), "at least one table"),
        (lambda: viz.plot_head_tables({"a": np.ones((2, 2)), "b": np.ones((2, 3))}), r"\[L, N\]"),
        (lambda: viz.plot_head_table(np.ones((2, 2)), ["one"]), "1 layer names for 2 layers"),
        (lambda: viz.plot_scores_over_steps([0, 1], {"s": [0.0]}, {"l": [1.0, 0.5]}),
         "one per step"),
    ],
    ids=["rank 1", "no tables", "shapes differ", "names", "series length"],
)
def test_bad_tables_raise_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
