"""flaxattn.train: the loop (resume, metrics, data parallel) and every task at tiny size.

The loop's own tests use a stand-in model that lives only here; the task tests run the real
models of flaxattn.nn for a few steps through ``train_and_evaluate`` in-process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import flaxattn.nn
from flaxattn import data
from flaxattn.export import load_attention
from flaxattn.train import (
    MetricsWriter,
    Task,
    TrainConfig,
    default_config,
    export_checkpoint,
    lower_train_step,
    train_and_evaluate,
    truncate_metrics,
)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- a stand-in


class StandIn(nnx.Module):
    """Two dense layers with dropout: enough to exercise params, RNG streams and the loop."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x, *, deterministic: bool):
        h = self.drop(jax.nn.relu(self.l1(x)), deterministic=deterministic)
        return self.l2(h)[..., 0]


def _regression_batch(seed, stream, step, n):
    x = data.make_rng(seed, stream, step).normal(size=(n, 4)).astype(np.float32)
    return {"x": x, "y": x @ np.arange(1, 5, dtype=np.float32)}


def _mse(model, b):
    return jnp.mean((model(b["x"], deterministic=True) - b["y"]) ** 2)


class StandInTask(Task):
    def make_model(self, rngs):
        return StandIn(rngs)

    def train_batch(self, step):
        return _regression_batch(self.config.seed, "train", step, self.config.batch_size)

    def loss(self, model, b):
        return jnp.mean((model(b["x"], deterministic=False) - b["y"]) ** 2), {}

    def evaluate(self, run):
        return {"mse": float(run(_mse, _regression_batch(self.config.seed, "eval", 0, 32)))}


STANDIN = TrainConfig(
    task="standin",
    steps=8,
    batch_size=8,
    log_every=1,
    eval_every=4,
    checkpoint_every=3,
    figures=False,
    learning_rate=1e-2,
    warmup_steps=2,
)


def _standin_run(workdir, config=STANDIN, **kwargs):
    return train_and_evaluate(config, workdir, task=StandInTask(config), progress=False, **kwargs)


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(Path(workdir, "checkpoints", str(step), "state"))


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _records(workdir):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# ----------------------------------------------------------------------------- the loop


def test_loop_writes_metrics_checkpoints_and_results(tmp_path):
    results = _standin_run(tmp_path)
    assert results["step"] == 8 and np.isfinite(results["mse"])
    records = _records(tmp_path)
    assert records[0]["split"] == "meta" and records[0]["config"]["steps"] == 8
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all({"loss", "learning_rate", "examples_per_sec"} <= r.keys() for r in train)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["final"]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [6, 8]
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 8
    with pytest.raises(FileExistsError, match="--resume"):  # never overwrite a run silently
        _standin_run(tmp_path)


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    _standin_run(tmp_path / "straight")

    def interrupt(step):
        if step == 5:  # not a checkpoint step: the Ctrl-C path must save step 5 itself
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _standin_run(tmp_path / "resumed", on_step=interrupt)
    assert (tmp_path / "resumed" / "checkpoints" / "5").is_dir()
    _standin_run(tmp_path / "resumed", resume=True)
    straight, resumed = (_saved_state(tmp_path / d, 8) for d in ("straight", "resumed"))
    assert _max_diff(straight, resumed) == 0.0  # bitwise: the seed fixes everything
    steps = [r["step"] for r in _records(tmp_path / "resumed") if r["split"] == "train"]
    assert steps == list(range(1, 9))  # no step lost, none repeated
    _standin_run(tmp_path / "seed1", dataclasses.replace(STANDIN, seed=1))
    assert _max_diff(straight["params"], _saved_state(tmp_path / "seed1", 8)["params"]) > 0


def test_metrics_writer_appends_lines_and_truncates(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as w:
        for step in range(5):
            w.write({"step": step, "loss": np.float32(step) / 2, "bad": float("nan")})
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[3]) == {"step": 3, "loss": 1.5, "bad": None}
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]


def test_mesh_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="data_parallel=4096"):
        _standin_run(tmp_path, dataclasses.replace(STANDIN, data_parallel=4096))
    with pytest.raises(ValueError, match="needs 4096 devices"):
        _standin_run(tmp_path, dataclasses.replace(STANDIN, mesh="data=64,seq=64"))
    with pytest.raises(ValueError, match="'data' axis is required"):
        _standin_run(tmp_path, dataclasses.replace(STANDIN, mesh="seq=2"))


@pytest.mark.multidevice
def test_data_and_sequence_parallel_on_cpu_devices_match_one_device(devices8, tmp_path):
    """4 'data' devices, and a 2 x 4 'data' x 'seq' mesh, train as one device does; with the
    'seq' axis the training step runs ring attention (collective permutes of K/V)."""
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus for a sharded run. " * 20, encoding="utf-8")
    base = dataclasses.replace(
        default_config("charlm"), text=str(text), steps=3, batch_size=8, log_every=1,
        eval_every=0, checkpoint_every=0, eval_examples=4, export_examples=0, num_samples=0,
        figures=False, context=16, d_model=16, num_heads=2, num_layers=1, d_ff=32,
        dropout_rate=0.1,
    )
    runs = {"one": dict(data_parallel=1), "data4": dict(data_parallel=4),
            "data2xseq4": dict(mesh="data=2,seq=4")}  # fmt: skip
    params, losses, attention, permutes = {}, {}, {}, {}
    for name, change in runs.items():
        config = dataclasses.replace(base, **change)
        train_and_evaluate(config, tmp_path / name, progress=False)
        params[name] = ocp.StandardCheckpointer().restore(
            tmp_path / name / "checkpoints" / "3" / "state"
        )["params"]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        losses[name] = [r["loss"] for r in records if r["split"] == "train"]
        attention[name] = [r["attention_train_step"] for r in records
                           if "attention_train_step" in r]  # fmt: skip
        # collective_permute: ring attention's ppermute of K/V blocks in the step's program
        permutes[name] = lower_train_step(config).as_text().count("collective_permute")
    # A 'seq' axis runs the self-attention as a ring (one layer: one call, traced once);
    # without one there is no ring attention_fn to record and no collective permute.
    assert attention["data2xseq4"] == [{"ring": 1}] and permutes["data2xseq4"] > 0
    assert attention["one"] == attention["data4"] == []
    assert permutes["one"] == permutes["data4"] == 0
    for name in ("data4", "data2xseq4"):
        diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                            params["one"], params[name])  # fmt: skip
        flat = [(jax.tree_util.keystr(p), d)
                for p, d in jax.tree_util.tree_flatten_with_path(diff)[0]]  # fmt: skip
        key_bias = max(d for p, d in flat if "['key']['bias']" in p)
        others = max(d for p, d in flat if "['key']['bias']" not in p)
        assert np.max(np.abs(np.subtract(losses["one"], losses[name]))) < 1e-5, name
        assert others < 1e-6, name
        # The key bias has a gradient that is mathematically zero (softmax ignores a constant
        # shift): Adam turns its rounding noise into steps of a fraction of the learning
        # rate (3e-3 here), which differ with the reduction order.
        assert key_bias < 1e-3, name


def test_mesh_attention_rings_what_it_can_and_names_why_not():
    """The policy of the training attention on a data=2 x seq=4 mesh, from shapes alone."""
    from jax.sharding import AbstractMesh

    from flaxattn import dot_product_attention
    from flaxattn.kernels._ring import RingAttentionFn
    from flaxattn.sharding import mesh_attention

    mesh = AbstractMesh((2, 4), ("data", "seq"))
    attention = mesh_attention(mesh)
    assert isinstance(attention, RingAttentionFn) and attention.fallback
    q = np.zeros((2, 16, 2, 4), np.float32)  # [B, T, N, H]
    zigzag = "layout='zigzag' on mesh axis 'seq' of size 4 needs the"
    cases = {  # (query, key, keywords) -> reason (None: ring)
        "T=S=16": ((q, q, {}), None),
        "cross, T=16, S=8": ((q, q[:, :8], {}), None),
        "decode, T=1": ((q[:, :1], q, {}), f"{zigzag} query length T=1 to be a multiple of 8"),
        "S=12": ((q, q[:, :12], {}), f"{zigzag} key/value length S=12 to be a multiple of 8"),
        "B=1": ((q[:1], q[:1], {}),
                "batch_axis='data' has 2 shards, which does not divide the batch size B=1"),
        "named kernel": ((q, q, {"implementation": "blocked"}), "implementation given"),
        "dropout": ((q, q, {"dropout_rate": 0.1, "dropout_key": jax.random.key(0)}),
                    "dropout_rate given"),
        "weights": ((q, q, {"return_weights": True}), "return_weights given"),
        "window": ((q, q, {"local_window_size": 16}),
                   "local_window_size=(16, 16) is larger than the sequence (S=16)"),
    }  # fmt: skip
    for name, ((query, key, kwargs), reason) in cases.items():
        got = attention.dense_reason(query, key, **kwargs)
        assert (got is None) if reason is None else got.startswith(reason), (name, got)
    contiguous = flaxattn.ring_attention_fn(mesh, "seq", batch_axis="data", fallback=True)
    assert contiguous.dense_reason(q[:, :12], q[:, :4]) is None  # P, not 2P, divides the lengths
    assert mesh_attention(AbstractMesh((2, 1), ("data", "seq"))) is dot_product_attention
    with pytest.raises(ValueError, match="needs a mesh with a 'seq' axis"):
        mesh_attention(AbstractMesh((2,), ("data",)))


# ----------------------------------------------------------------------------- every task


# eval_examples == export_examples: export reuses the functions compiled for evaluation.
TINY = dict(steps=3, batch_size=8, log_every=1, eval_every=2, checkpoint_every=0,
            eval_examples=4, export_examples=4, figures=False)  # fmt: skip
TINY_TRANSFORMER = dict(d_model=16, num_heads=2, num_layers=1, d_ff=32)
TINY_RNN = dict(embed_dim=8, hidden_dim=8)


def _needs(*names):
    missing = [n for n in names if not hasattr(flaxattn.nn, n)]
    return pytest.mark.skipif(bool(missing), reason=f"flaxattn.nn lacks {missing}")


CASES = {
    "reverse": ({**TINY_TRANSFORMER, "max_len": 5}, ["exact_match", "alignment"]),
    "sort": ({**TINY_TRANSFORMER, "max_len": 5}, ["exact_match", "alignment"]),  # slow: as reverse
    "dates-rnn": ({**TINY_RNN, "model": "rnn"}, ["exact_match", "alignment", "alignment_year"]),
    "dates-transformer": (
        {**TINY_TRANSFORMER, "model": "transformer"}, ["exact_match", "alignment_day"]),
    "sentiment-rnn": ({**TINY_RNN, "model": "rnn"},
                      ["accuracy", "attention_mass_on_sentiment", "uniform_baseline"]),
    "sentiment-transformer": ({**TINY_TRANSFORMER, "model": "transformer"},
                              ["accuracy", "attention_mass_on_sentiment", "uniform_baseline"]),
    "charlm": ({**TINY_TRANSFORMER, "context": 16, "sample_chars": 8, "num_samples": 1},
               ["bits_per_char"]),
    "nadaraya_watson": ({"n_train": 12, "n_test": 6, "figures": True},  # the cheapest
                        ["mse", "mse_nonparametric", "bandwidth"]),
}  # fmt: skip
NEEDS = {
    "dates-rnn": ("BahdanauSeq2Seq",),
    "sentiment-rnn": ("RNNAttentionClassifier",),
    "nadaraya_watson": ("NadarayaWatson",),
}


SLOW = {"sort"}  # the same code path as reverse


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=[_needs(*NEEDS.get(c, ()))] + [pytest.mark.slow] * (c in SLOW))
        for c in CASES
    ],
)
def test_task_runs_end_to_end_at_tiny_size(case, tmp_path):
    changes, expected = CASES[case]
    config = dataclasses.replace(default_config(case.split("-")[0]), **{**TINY, **changes})
    if config.task == "charlm":
        text = tmp_path / "corpus.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
        config = dataclasses.replace(config, text=str(text))
    results = train_and_evaluate(config, tmp_path / "run", progress=False)
    for name in expected:
        assert np.isfinite(results[name]), (name, results)
    records = _records(tmp_path / "run")
    final = [r for r in records if r.get("final")][-1]
    assert all(name in final for name in expected)
    export = load_attention(tmp_path / "run" / "attention.npz")
    assert export.meta["task"] == config.task and export.meta["step"] == 3
    for path in export.paths:
        w = export.layers[path]
        assert w.ndim == 4 and np.all(np.isfinite(w))
    if config.figures:
        figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
        assert {"training_curves.png", "regression.png"} <= set(figures)
        assert any(f.startswith("heatmap") for f in figures)
        assert all((tmp_path / "run" / "figures" / f).stat().st_size > 1000 for f in figures)
        assert "flaxattn-data" in (tmp_path / "run" / "figures" / "view.html").read_text()
    if config.task == "charlm":
        assert (tmp_path / "run" / "samples.txt").read_text().strip()
    if config.task == "reverse":  # re-exporting from the checkpoint gives the same weights
        again = load_attention(export_checkpoint(tmp_path / "run", tmp_path / "again.npz"))
        assert again.paths == export.paths and again.meta["step"] == 3
        for path in export.paths:
            np.testing.assert_allclose(again.layers[path], export.layers[path], atol=1e-6)


# ----------------------------------------------------------------------------- outcomes


OUTCOMES = {
    # case: (changes to the default config, {metric: minimum})
    "reverse": ({}, {"exact_match": 0.99, "alignment": 0.95}),
    "dates-rnn": ({"model": "rnn"}, {"exact_match": 0.98}),
    "dates-transformer": ({"model": "transformer"}, {"exact_match": 0.98}),
    "sentiment-rnn": ({"model": "rnn"}, {"accuracy": 0.95}),
    "sentiment-transformer": ({"model": "transformer"}, {"accuracy": 0.95}),
    "charlm": ({}, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OUTCOMES))
def test_default_run_reaches_its_outcome(case, tmp_path):
    """The README's numbers: each default run (minutes on a 2-core CPU) solves its task."""
    changes, minimum = OUTCOMES[case]
    config = dataclasses.replace(default_config(case.split("-")[0]), **changes)
    results = train_and_evaluate(config, tmp_path, progress=False)
    for name, bound in minimum.items():
        assert results[name] >= bound, (name, results[name])
    if config.task == "sentiment":  # attention prefers the sentiment words to uniform
        assert results["attention_mass_on_sentiment"] > results["uniform_baseline"]
    if config.task == "charlm":  # validation bits per character fall
        bpc = [r["bits_per_char"] for r in _records(tmp_path) if r["split"] == "eval"]
        assert len(bpc) >= 3 and bpc[-1] < bpc[0] and all(np.diff(bpc) < 0.05)
