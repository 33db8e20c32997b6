"""The induction task: its data, its config, a tiny end-to-end run with the report, and the
ablation table the reverse task gains."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from flaxattn import data
from flaxattn.train import (
    InductionConfig,
    Runner,
    default_config,
    make_task,
    train_and_evaluate,
    training_mesh,
)
from flaxattn.train._induction import corrupt_batch, induction_batch
from flaxattn.train._loop import init_state

# tiny runs; positional "none" and no export keep them to the code main checks strictly
TINY = dict(steps=3, batch_size=4, eval_examples=4, eval_every=2, log_every=1,
            checkpoint_every=0, export_examples=0, d_model=8, num_heads=2, positional="none")


def batch(seed=0, n=16):
    return induction_batch(n, data.make_rng(seed), vocab=20, length=30, min_segment=4,
                           max_segment=9)


def sequences(b):
    return np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)


def test_every_sequence_repeats_its_segment_and_the_masks_cover_both_copies():
    b = batch()
    seqs = sequences(b)
    assert b["inputs"].shape == b["targets"].shape == b["first"].shape == (16, 30)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for row, (P, a) in enumerate(zip(b["segment"], b["start"], strict=True)):
        assert 4 <= P <= 9 and 0 <= a <= 31 - 2 * P
        np.testing.assert_array_equal(seqs[row, a : a + P], seqs[row, a + P : a + 2 * P])
        assert list(np.nonzero(b["first"][row])[0]) == list(range(a, a + P - 1))
        assert list(np.nonzero(b["repeat"][row])[0]) == list(range(a + P, a + 2 * P - 1))
        # a repeat target is the token after the same position of the first copy
        i = a + P + 1
        assert b["targets"][row, i] == seqs[row, i + 1 - P]
    assert len(set(b["start"].tolist())) > 1 and len(set(b["segment"].tolist())) > 1


@pytest.mark.parametrize("which", ["first", "repeat"])
def test_corruption_shuffles_one_copy_and_nothing_else(which):
    b = batch(1)
    c = corrupt_batch(b, which, data.make_rng(2))
    clean, dirty = sequences(b), sequences(c)
    for key in ("first", "repeat", "segment", "start"):
        np.testing.assert_array_equal(b[key], c[key])
    changed = 0
    for row, (P, a) in enumerate(zip(b["segment"], b["start"], strict=True)):
        at = a if which == "first" else a + P
        inside = np.zeros(clean.shape[1], bool)
        inside[at : at + P] = True
        np.testing.assert_array_equal(clean[row, ~inside], dirty[row, ~inside])
        assert sorted(clean[row, inside]) == sorted(dirty[row, inside])
        changed += not np.array_equal(clean[row, inside], dirty[row, inside])
    assert changed >= 12  # of 16 (a shuffle can leave a short segment as it was)
    with pytest.raises(ValueError, match="which must be one of"):
        corrupt_batch(b, "middle", data.make_rng(0))


@pytest.mark.parametrize(
    "changes, message",
    [({"max_segment": 40}, "max_segment"), ({"min_segment": 0}, "min_segment"),
     ({"num_layers": 1}, "num_layers")],
    ids=["segment too long", "empty segment", "one layer"],
)
def test_config_validates_its_fields(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(default_config("induction"), **changes)


def tiny_config(**changes):
    return dataclasses.replace(default_config("induction"), **TINY, vocab=16, context=16,
                               min_segment=2, max_segment=6, **changes)


def test_induction_task_runs_end_to_end_and_records_every_heads_scores(tmp_path):
    config = tiny_config(report=False)
    assert isinstance(config, InductionConfig)
    results = train_and_evaluate(config, tmp_path, progress=False)
    assert np.isfinite(results["first_loss"]) and np.isfinite(results["repeat_loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    for r in evals:  # every head's scores, [L][N]
        assert np.shape(r["induction"]) == np.shape(r["previous_token"]) == (2, 2)
        assert np.isfinite(r["first_loss"]) and np.isfinite(r["repeat_loss"])
    assert not (tmp_path / "interp.json").exists()


@pytest.mark.slow  # ~20 s: compiles every ablation, patching and attribution program
def test_induction_task_runs_end_to_end_with_its_report(tmp_path):
    results = train_and_evaluate(tiny_config(), tmp_path, progress=False)
    report = results["induction_report"]
    assert np.isfinite(report["first_loss"]) and np.isfinite(report["repeat_loss"])
    saved = json.loads((tmp_path / "interp.json").read_text())
    assert np.shape(saved["ablation"]["zero"]["table"]) == (2, 2)
    assert set(saved["patching"]) == {"first_shuffled/output", "first_shuffled/pattern",
                                      "repeat_shuffled/output"}
    assert saved["phase_change"]["steps"] == [2, 3]
    for name in ("interp_scores", "interp_ablation", "interp_patching",
                 "interp_logit_attribution", "interp_phase_change"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000


def test_reverse_task_reports_which_heads_matter(tmp_path):
    # the end-of-run step alone, on a freshly initialised model (no training needed)
    config = dataclasses.replace(
        default_config("reverse"), **{**TINY, "max_len": 5, "d_model": 8, "d_ff": 8})
    task = make_task(config)
    graphdef, state, rest, *_ = init_state(task, config, training_mesh(1))
    results = task.finish(Runner(graphdef, state["params"], rest), tmp_path)
    ablation = results["ablation"]
    assert ablation["layers"] == ["encoder/layers/0/self_attention",
                                  "decoder/layers/0/self_attention",
                                  "decoder/layers/0/cross_attention"]
    assert np.shape(ablation["zero"]) == np.shape(ablation["mean"]) == (3, 2)
    assert np.all(np.isfinite(ablation["zero"])) and np.isfinite(ablation["loss"])
    assert (tmp_path / "figures" / "ablation.png").stat().st_size > 1000
