"""What a training task provides, and the runner that calls model functions under ``jit``.

A :class:`Task` is the only task-specific part of a run: it builds the model, produces the
batch of a given step, defines the loss, evaluates, and exports attention. The loop in
:mod:`flaxattn.train._loop` does the rest (optimizer, sharding, checkpoints, metrics).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.train._config import TrainConfig

Batch = dict[str, np.ndarray]


class Runner:
    """Calls ``fn(model, *args)`` with the current parameters, compiled once per function.

    The loop keeps parameters as ``nnx.State`` outside the model; a runner merges them into a
    fresh model inside ``jax.jit``, so evaluation and export reuse one compiled program per
    function (and per set of static keyword arguments). ``out_sharding`` (the loop passes
    the mesh's replicated sharding) fixes where results go: replicated results can be read on
    every process, also when the mesh spans several.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        rest: nnx.State,
        out_sharding: jax.sharding.Sharding | None = None,
    ):
        self.graphdef, self.params, self.rest = graphdef, params, rest
        self.out_sharding = out_sharding
        self._compiled: dict[Any, Callable] = {}

    def model(self) -> nnx.Module:
        """A model holding the current parameters (eager; for code that cannot be jitted)."""
        return nnx.merge(self.graphdef, self.params, self.rest, copy=True)

    def __call__(self, fn: Callable, *args, **static) -> Any:
        key = (fn, tuple(sorted(static.items())))
        if key not in self._compiled:
            graphdef = self.graphdef

            def call(params, rest, *args):
                return fn(nnx.merge(graphdef, params, rest, copy=True), *args, **static)

            placed = {} if self.out_sharding is None else {"out_shardings": self.out_sharding}
            self._compiled[key] = jax.jit(call, **placed)
        return self._compiled[key](self.params, self.rest, *args)


class Task(abc.ABC):
    """One training task. Subclasses set :attr:`config` and implement the abstract methods.

    Batches are dicts of numpy arrays whose leading axis is the example axis (sharded over the
    'data' mesh axis unless :attr:`shard_batch` is False), and :meth:`train_batch` must be a
    pure function of the seed and the step: resuming relies on it.
    """

    shard_batch: bool = True  # False: the batch is replicated (e.g. full-batch regression)
    # The attention_fn for the Transformer models of make_model: set by the loop before it
    # builds the model (see flaxattn.train._mesh.attention_for_mesh); None = the modules'
    # default, flaxattn.dot_product_attention.
    attention_fn: Callable[..., Any] | None = None

    def __init__(self, config: TrainConfig):
        self.config = config

    @abc.abstractmethod
    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model."""

    @abc.abstractmethod
    def train_batch(self, step: int) -> Batch:
        """The training batch of ``step`` (0-based)."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array]):
        """``(scalar loss, {name: scalar metric})`` in training mode (traced under jit)."""

    @abc.abstractmethod
    def evaluate(self, run: Runner) -> dict[str, float]:
        """Held-out metrics, named plainly (``exact_match``, ``accuracy``, ...)."""

    def export(
        self,
        run: Runner,
        path: Path,
        meta: dict[str, Any],
        *,
        inputs: Sequence[str] | None = None,
        examples: int | None = None,
        top_k: int | None = None,
        layer_filter: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
    ) -> Path | None:
        """Write attention to ``path`` (:mod:`flaxattn.export` format); None if there is none.

        ``inputs`` are user strings to run the model on (see :meth:`encode_inputs`); without
        them, the first ``examples`` (default ``config.export_examples``) held-out examples.
        ``top_k`` (default ``config.export_top_k``), ``layer_filter`` and ``heads`` bound it.
        """
        if inputs:
            b = self.encode_inputs(run, inputs)
        else:
            n = self.config.export_examples if examples is None else examples
            if n <= 0:
                return None
            b = self.export_set(n)
            if b is None:
                return None
        bounded = {
            "top_k": top_k or self.config.export_top_k or None,
            "layer_filter": layer_filter or None,
            "heads": heads,
        }
        return self.write_export(run, b, path, meta, bounded=bounded, user_inputs=bool(inputs))

    def export_set(self, n: int) -> Batch | None:
        """The first ``n`` held-out examples (of ``self.eval_set``; None for a task without)."""
        eval_set = getattr(self, "eval_set", None)
        return None if eval_set is None else {k: v[:n] for k, v in eval_set.items()}

    def encode_inputs(self, run: Runner, inputs: Sequence[str]) -> Batch:
        """A batch from user strings, in the layout of the held-out set."""
        raise ValueError(f"task {self.config.task!r} does not take inputs")

    def write_export(
        self,
        run: Runner,
        b: Batch,
        path: Path,
        meta: dict[str, Any],
        *,
        bounded: dict[str, Any],
        user_inputs: bool,
    ) -> Path | None:
        """Capture the attention on ``b`` and save it (``bounded``: keywords of
        :func:`flaxattn.export.save_attention`); None for a task without attention."""
        return None

    def finish(self, run: Runner, workdir: Path) -> dict[str, Any]:
        """Anything else to do at the end of a run (e.g. samples); extra results to report."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts about the data worth recording (vocabulary size, ...)."""
        return {}


# ----------------------------------------------------------------------------- shared helpers


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array):
    """Mean token cross-entropy (nats) and accuracy over ``valid`` positions.

    ``logits [..., V]``, ``targets [...]`` int, ``valid [...]`` bool.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid.sum(), 1)
    loss = jnp.where(valid, nll, 0.0).sum() / count
    correct = (jnp.argmax(logits, -1) == targets) & valid
    return loss, correct.sum() / count


def length_mask(lengths: jax.Array, width: int) -> jax.Array:
    """``[B, width]`` bool, True at positions below each length."""
    return jnp.arange(width)[None, :] < lengths[:, None]


def exact_match(predicted: np.ndarray, target: np.ndarray, eos_id: int) -> np.ndarray:
    """Per-example bool: the prediction equals the target up to and including the first EOS.

    ``predicted [B, P]`` and ``target [B, T]`` ids; a prediction with no EOS matches only if
    the target's content fills it exactly.
    """

    def until_eos(row):
        row = list(map(int, row))
        return row[: row.index(eos_id) + 1] if eos_id in row else row

    return np.array([until_eos(p) == until_eos(t) for p, t in zip(predicted, target, strict=True)])


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
