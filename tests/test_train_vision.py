"""The image tasks end to end at tiny size: metrics, export with images, figures, resume."""

import dataclasses
import json

import numpy as np
import pytest

from flaxattn import viz
from flaxattn.export import load_attention
from flaxattn.train import default_config, train_and_evaluate

TINY = dict(steps=3, batch_size=8, eval_every=0, checkpoint_every=0, eval_examples=8,
            export_examples=4, warmup_steps=1, log_every=1)  # fmt: skip
SMALL_VIT = dict(d_model=16, num_heads=2, num_layers=2, d_ff=16)
SMALL_CNN = dict(cnn_width=4, cbam_kernel=3)
CASES = {
    "digits-vit": ("digits", {"model": "vit", **SMALL_VIT}),
    "digits-cnn_se": ("digits", {"model": "cnn_se", **SMALL_CNN}),
    "cluttered-vit": ("cluttered", {"model": "vit", **SMALL_VIT, "canvas": 16, "digit_scale": 1}),
    "cluttered-cnn_cbam": ("cluttered", {"model": "cnn_cbam", **SMALL_CNN, "canvas": 16,
                                         "digit_scale": 1}),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_task_end_to_end(case, tmp_path):
    task, changes = CASES[case]
    figures = case in ("cluttered-vit", "cluttered-cnn_cbam")
    config = dataclasses.replace(default_config(task), **TINY, **changes, figures=figures)
    results = train_and_evaluate(config, tmp_path, progress=False)
    assert 0.0 <= results["accuracy"] <= 1.0
    export = load_attention(tmp_path / "attention.npz")
    assert export.format_version == 2 and export.num_examples == 4
    side = 8 if task == "digits" else 16
    assert export.image.pixels.shape == (4, side, side)
    np.testing.assert_array_equal(export.extras["label"].shape, (4,))
    if task == "cluttered":
        assert export.image.box.shape == (4, 4)
        for key in ("pointing", "pointing_chance", "pointing_over_chance"):
            assert np.isfinite(results[key]), (key, results)
        assert 0 < results["pointing_chance"] < 1
    if config.model == "vit":
        assert tuple(export.image.grid) == (side // config.patch,) * 2
        assert export.image.prefix == 1 and len(export.paths) == 2
        if task == "cluttered":
            assert "pointing/rollout/layers/1/self_attention" in results
    else:
        assert len(export.channel) == 2 and not export.paths
        assert bool(export.spatial) == (config.model == "cnn_cbam")
        if config.model == "cnn_cbam":
            assert "pointing/spatial/blocks/1" in results
    if figures:
        out = tmp_path / "figures"
        names = {p.name for p in out.glob("*.png")}
        expected = {"training_curves.png", "image_examples.png"} | (
            {"vit_attention.png"} if config.model == "vit"
            else {"spatial_maps.png", "channel_weights.png"}
        )  # fmt: skip
        assert expected <= names, names
        assert all((out / n).stat().st_size > 1000 for n in names)


def test_image_task_resumes(tmp_path):
    config = dataclasses.replace(default_config("digits"), **{**TINY, "checkpoint_every": 2},
                                 **SMALL_CNN, model="cnn_se", figures=False)  # fmt: skip
    train_and_evaluate(dataclasses.replace(config, steps=2), tmp_path / "a", progress=False)
    resumed = train_and_evaluate(config, tmp_path / "a", progress=False, resume=True)
    straight = train_and_evaluate(config, tmp_path / "b", progress=False)
    assert resumed["accuracy"] == straight["accuracy"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert max(steps) == 3


def test_vision_plots_reject_exports_without_images(tmp_path):
    from flaxattn.export import save_attention

    path = save_attention(tmp_path / "a.npz", layers={"l": np.full((1, 1, 2, 2), 0.5)},
                          kinds="self", query_tokens=[["a", "b"]])  # fmt: skip
    with pytest.raises(ValueError, match="no images"):
        viz.plot_vision(path, tmp_path)


OUTCOMES = {
    "digits-vit": ("digits", {"model": "vit"}, {"accuracy": 0.97}),
    "digits-cnn_se": ("digits", {"model": "cnn_se"}, {"accuracy": 0.98}),
    "digits-cnn_cbam": ("digits", {"model": "cnn_cbam"}, {"accuracy": 0.98}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OUTCOMES))
def test_default_image_run_reaches_its_outcome(case, tmp_path):
    """The README's digits numbers (each default run well under a minute on a 2-core CPU)."""
    task, changes, minimum = OUTCOMES[case]
    config = dataclasses.replace(default_config(task), **changes, figures=False)
    results = train_and_evaluate(config, tmp_path, progress=False)
    for name, bound in minimum.items():
        assert results[name] >= bound, (name, results[name])
