"""Attention pooling: Nadaraya-Watson kernel regression (the smallest attention there is).

``f(x) = sum_i softmax(-((x - x_i) w)^2 / 2) y_i``: queries are test inputs, keys the
training inputs and values their targets. With a fixed bandwidth it is non-parametric; with a
learned one, ``w`` is trained by leave-one-out regression on the training points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn import data
from flaxattn.export import save_attention
from flaxattn.train._config import NadarayaWatsonConfig
from flaxattn.train._task import Batch, Runner, Task


def _predict(model, queries, keys, values):
    return model(queries, keys, values)


def _bandwidth(model):
    return model.h


def _capture(model, queries, keys, values):
    from flaxattn.nn import capture_attention

    return capture_attention(model, queries, keys, values)


class NadarayaWatsonTask(Task):
    config: NadarayaWatsonConfig
    shard_batch = False  # one full batch of leave-one-out rows, replicated

    def __init__(self, config: NadarayaWatsonConfig):
        super().__init__(config)
        self.points = data.nadaraya_watson_data(
            config.n_train,
            config.n_test,
            rng=data.make_rng(config.seed, "data"),
            noise=config.noise,
        )
        x, y = self.points["x_train"], self.points["y_train"]
        keys, values = data.leave_one_out(x, y)
        self.loo = {"queries": x[:, None], "keys": keys, "values": values, "targets": y[:, None]}

    def make_model(self, rngs: nnx.Rngs):
        from flaxattn.nn import NadarayaWatson

        return NadarayaWatson(learn_bandwidth=self.config.learn_bandwidth, rngs=rngs)

    def train_batch(self, step: int) -> Batch:
        return self.loo

    def loss(self, model, b):
        pred = model(b["queries"], b["keys"], b["values"])
        return jnp.mean((pred - b["targets"]) ** 2), {}

    def _test(self) -> tuple[np.ndarray, ...]:
        p = self.points
        return p["x_test"][None], p["x_train"][None], p["y_train"][None]

    def evaluate(self, run: Runner) -> dict[str, float]:
        pred = np.asarray(run(_predict, *self._test()))[0]
        metrics = {"mse": float(np.mean((pred - self.points["y_test"]) ** 2))}
        if self.config.learn_bandwidth:
            from flaxattn.nn import NadarayaWatson

            fixed = NadarayaWatson(learn_bandwidth=False, rngs=nnx.Rngs(0))
            base = np.asarray(fixed(*map(jnp.asarray, self._test())))[0]
            metrics["mse_nonparametric"] = float(np.mean((base - self.points["y_test"]) ** 2))
            metrics["bandwidth"] = float(run(_bandwidth))
        return metrics

    def export_set(self, n: int) -> Batch:
        """The test grid: one example whose queries are the test points."""
        x_test, x_train, y_train = self._test()
        return {"queries": x_test, "keys": x_train, "values": y_train}

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        _, captured = jax.device_get(run(_capture, b["queries"], b["keys"], b["values"]))
        if not captured:
            return None
        fmt = lambda rows: [[f"{v:.2f}" for v in row] for row in rows]
        return save_attention(
            path,
            layers={p or "nadaraya_watson": w for p, w in captured.items()},  # the root is ''
            kinds="cross",
            query_tokens=fmt(b["queries"]),
            key_tokens=fmt(b["keys"]),
            meta=meta,
            **bounded,
        )

    def finish(self, run: Runner, workdir: Path) -> dict[str, Any]:
        """A figure of the fit: training points, the true function and the prediction."""
        if not self.config.figures:
            return {}
        from matplotlib.figure import Figure

        from flaxattn.viz import save_figure

        p = self.points
        pred = np.asarray(run(_predict, *self._test()))[0]
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        ax = fig.subplots()
        ax.plot(p["x_train"], p["y_train"], "o", alpha=0.5, label="training points")
        ax.plot(p["x_test"], p["y_test"], label="truth")
        label = "learned bandwidth" if self.config.learn_bandwidth else "fixed bandwidth"
        ax.plot(p["x_test"], pred, "--", label=f"Nadaraya-Watson, {label}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(fontsize=8)
        out = save_figure(fig, workdir / "figures" / "regression.png")
        return {"regression_figure": str(out)}
