"""The training loop: ``train_and_evaluate(config, workdir)``.

One run writes, under ``workdir``: ``metrics.jsonl`` (training and evaluation records),
``checkpoints/`` (orbax, every ``checkpoint_every`` steps and at the end), ``attention.npz``
(the attention of a few held-out examples, :mod:`flaxattn.export` format), ``figures/*.png``
and ``results.json`` (the final metrics). Resuming continues from the latest checkpoint with
no step lost or repeated; Ctrl-C saves a checkpoint before the program exits.

On several processes (after ``jax.distributed.initialize()``) every process runs this same
loop: every computation, checkpoints included (orbax coordinates the processes' writes), but
only process 0 writes the metrics, the export, the figures and ``results.json`` and prints;
the others run the export and the task's ``finish`` into a scratch directory they delete,
since those compute on the global mesh too. ``workdir`` must be one directory that every
process sees (a shared file system) for the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxattn.kernels._ring import RingAttentionFn
from flaxattn.kernels._ring._api import RING_COUNT
from flaxattn.sharding import replicate
from flaxattn.train._checkpoint import Checkpointer
from flaxattn.train._config import TrainConfig, validate_config
from flaxattn.train._mesh import (
    attention_for_mesh,
    check_batch_size,
    put_batch,
    replicated,
    training_mesh,
)
from flaxattn.train._metrics import MetricsWriter, truncate_metrics
from flaxattn.train._task import Runner, Task, config_dict

METRICS_FILE = "metrics.jsonl"
EXPORT_FILE = "attention.npz"
RESULTS_FILE = "results.json"


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * 0.05,
    )
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.chain(*parts), schedule


def _rng_tags(model: nnx.Module) -> list[str]:
    tags = {s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
    return sorted(tags)


def init_state(task: Task, config: TrainConfig, mesh):
    """A fresh model split into ``(graphdef, {params, opt_state}, rest)``, placed on ``mesh``
    (replicated), with the optimizer, its schedule and the model's RNG stream names.

    The model's attention is chosen for ``mesh`` first (``task.attention_fn``, see
    :func:`flaxattn.train._mesh.attention_for_mesh`): ring attention on a 'seq' axis."""
    task.attention_fn = attention_for_mesh(mesh)
    model = task.make_model(nnx.Rngs(config.seed))
    tags = _rng_tags(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(config)
    state = replicate({"params": params, "opt_state": tx.init(params)}, mesh)
    return graphdef, state, replicate(rest, mesh), tx, schedule, tags


def _make_train_step(task: Task, graphdef, tx, tags: list[str], seed: int, mesh):
    base_key = jax.random.key(seed)

    def train_step(state, rest, batch, step):
        if tags:  # dropout keys are a pure function of (seed, step): resumable, reproducible
            key = jax.random.fold_in(jax.random.fold_in(base_key, 1), step)
            model = nnx.merge(graphdef, state["params"], rest, copy=True)
            nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})
            _, _, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params):
            return task.loss(nnx.merge(graphdef, params, rest, copy=True), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return {"params": params, "opt_state": opt_state}, metrics

    rep = replicated(mesh)
    return jax.jit(train_step, out_shardings=(rep, rep))


def lower_train_step(
    config: TrainConfig, *, task: Task | None = None, step: int = 0
) -> jax.stages.Lowered:
    """The training step of ``config``, lowered (not compiled) on the batch of ``step``.

    For inspecting the program a run executes: e.g. with ``mesh='data=2,seq=4'``,
    ``lower_train_step(config).as_text()`` contains ``collective_permute`` (ring attention
    passing K/V round the 'seq' axis), which a 'data'-only mesh does not.
    """
    validate_config(config)
    if task is None:
        from flaxattn.train._registry import make_task

        task = make_task(config)
    mesh = training_mesh(config.data_parallel, config.mesh)
    graphdef, state, rest, tx, _, tags = init_state(task, config, mesh)
    train_step = _make_train_step(task, graphdef, tx, tags, config.seed, mesh)
    batch = put_batch(task.train_batch(step), mesh, shard=task.shard_batch)
    return train_step.lower(state, rest, batch, jnp.int32(step))


def _record_attention(
    attention_fn: Any, step: int, writer: MetricsWriter | _NoMetrics, main: bool
) -> None:
    """After the first step: how the training step's attention calls run (trace-time counts
    of a ring attention_fn with fallback), as a metrics record, and a warning (``main``:
    printed) for any that do not ring."""
    if not isinstance(attention_fn, RingAttentionFn):
        return
    counts = dict(sorted(attention_fn.counts.items()))
    writer.write({"step": step, "split": "meta", "attention_train_step": counts})
    dense = {k: v for k, v in counts.items() if k != RING_COUNT}
    if dense and main:
        print(f"attention: {sum(dense.values())} call(s) of the training step run without "
              f"the ring: {dense}", file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def _deferred_interrupt():
    """The first Ctrl-C only sets a flag (the loop saves, then stops); a second one aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("\ninterrupt: saving a checkpoint, Ctrl-C again to abort", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _NoMetrics:
    """What processes other than 0 write metrics to: nothing."""

    def write(self, record: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
        unit="step",
        desc="train",
        file=sys.stderr,
        mininterval=0.5,
    )


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    task: Task | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``config``'s task, evaluate, checkpoint, export attention and draw figures.

    Args:
      config: a task configuration (see :mod:`flaxattn.train._config`).
      workdir: the run's directory; everything the run writes goes under it.
      resume: continue from the latest checkpoint in ``workdir`` (a fresh start if none).
        Without it, a ``workdir`` that already holds checkpoints is an error.
      progress: show a progress bar (loss and throughput) on stderr.
      task: the task object (default: built from ``config.task``).
      on_step: called with the number of completed steps after each step.

    Returns:
      The final results: the last evaluation's metrics, ``step``, ``wall_seconds`` and the
      paths written. They are also saved to ``workdir/results.json``. (On several processes,
      only process 0 writes and prints; every process returns the same metrics.)
    """
    validate_config(config)
    if task is None:
        from flaxattn.train._registry import make_task

        task = make_task(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    main = jax.process_index() == 0  # the process that writes files and prints

    mesh = training_mesh(config.data_parallel, config.mesh)
    if task.shard_batch:
        check_batch_size(config.batch_size, mesh)
    graphdef, state, rest, tx, schedule, tags = init_state(task, config, mesh)

    ckpt = Checkpointer(
        workdir / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    metrics_path = workdir / METRICS_FILE
    start = 0
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise FileExistsError(
            f"{workdir} already holds checkpoints (latest step {latest}); "
            "resume with --resume or choose another --workdir"
        )
    if latest is not None:
        state, saved = ckpt.restore(latest, like=state)
        if saved.get("config", {}).get("task") not in (None, config.task):
            raise ValueError(f"the checkpoint in {workdir} is for task {saved['config']['task']!r}")
        start = int(saved["step"])
    if main:
        truncate_metrics(metrics_path, start) if start else metrics_path.unlink(missing_ok=True)

    def meta(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_position": step,
            "seed": config.seed,
            "config": config_dict(config),
        }

    train_step = _make_train_step(task, graphdef, tx, tags, config.seed, mesh)
    run = Runner(graphdef, state["params"], rest, out_sharding=replicated(mesh))
    writer = MetricsWriter(metrics_path) if main else _NoMetrics()
    if start == 0:
        writer.write(
            {
                "step": 0,
                "split": "meta",
                "task": config.task,
                "config": config_dict(config),
                "data": task.describe(),
                "mesh": ",".join(f"{k}={v}" for k, v in mesh.shape.items()),
                "platform": jax.devices()[0].platform,
                "processes": jax.process_count(),
            }
        )

    bar = _progress(config.steps, start, progress and main)
    last_eval: dict[str, Any] = {}
    step = start
    window_start, window_steps = time.perf_counter(), 0
    try:
        with _deferred_interrupt() as interrupted:
            while step < config.steps:
                batch = put_batch(task.train_batch(step), mesh, shard=task.shard_batch)
                state, metrics = train_step(state, rest, batch, jnp.int32(step))
                step += 1
                if step == start + 1:  # traced and compiled by now
                    _record_attention(task.attention_fn, step, writer, main)
                window_steps += 1
                if step % max(config.log_every, 1) == 0 or step == config.steps:
                    metrics = jax.device_get(metrics)
                    seconds = time.perf_counter() - window_start
                    rate = window_steps / max(seconds, 1e-9)
                    record = {
                        "step": step,
                        "split": "train",
                        **metrics,
                        "learning_rate": float(schedule(step - 1)),
                        "steps_per_sec": rate,
                        "examples_per_sec": rate * config.batch_size,
                    }
                    writer.write(record)
                    bar.set_postfix(
                        loss=f"{float(metrics['loss']):.4f}",
                        ex_per_s=f"{rate * config.batch_size:.0f}",
                    )
                    if not math.isfinite(float(metrics["loss"])):
                        raise FloatingPointError(f"loss is {metrics['loss']} at step {step}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    run.params = state["params"]
                    last_eval = task.evaluate(run)
                    writer.write({"step": step, "split": "eval", **last_eval})
                    if main:
                        bar.write(_eval_line(step, last_eval))
                if ckpt.should_save(step):
                    ckpt.save(step, state, meta(step))
                if on_step is not None:
                    on_step(step)
                if interrupted.is_set():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        ckpt.save(step, state, meta(step))
        ckpt.close()
        writer.close()
        if main:
            print(f"saved checkpoint at step {step} in {ckpt.directory}", file=sys.stderr)
        raise
    except BaseException:
        bar.close()
        ckpt.close()
        writer.close()
        raise
    bar.close()
    ckpt.save(step, state, meta(step))

    run.params = state["params"]
    last_eval = task.evaluate(run)
    writer.write({"step": step, "split": "eval", "final": True, **last_eval})
    if main:
        print(_eval_line(step, last_eval), file=sys.stderr)
    results: dict[str, Any] = {"task": config.task, "step": step, **last_eval}
    out = workdir if main else Path(tempfile.mkdtemp(prefix="flaxattn-scratch-"))
    try:
        export_path = task.export(run, out / EXPORT_FILE, meta(step) | {"task": config.task})
        results.update(task.finish(run, out))
    finally:
        if not main:
            shutil.rmtree(out, ignore_errors=True)
    writer.close()
    ckpt.close()
    if main and export_path is not None:
        results["attention_export"] = str(export_path)
    if main and config.figures:
        results["figures"] = [str(p) for p in draw_figures(workdir, export_path)]
    results["wall_seconds"] = time.perf_counter() - started
    results["devices"] = mesh.size
    results["processes"] = jax.process_count()
    results["mesh"] = dict(mesh.shape)
    results["platform"] = jax.devices()[0].platform
    if isinstance(task.attention_fn, RingAttentionFn):  # every program of the run, traced calls
        results["attention"] = dict(sorted(task.attention_fn.counts.items()))
    if main:
        _write_json(workdir / RESULTS_FILE, results)
    return results


def _eval_line(step: int, metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return f"eval @ {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items())


def draw_figures(workdir: Path, export_path: Path | None) -> list[Path]:
    """Training curves, and the attention figures of the export, under ``workdir/figures``,
    with ``view.html``, the interactive explorer of the export (:func:`flaxattn.viz.explore`)."""
    from flaxattn import viz

    out = workdir / "figures"
    viz.plot_training_curves(workdir / METRICS_FILE, path=out / "training_curves.png")
    written = [out / "training_curves.png"]
    if export_path is not None:
        from flaxattn.export import load_attention

        export = load_attention(export_path)
        if export.paths:  # a CNN's export holds only spatial / channel maps
            paths, _ = viz.plot_export(
                export, out, kinds=[k for k in viz.PLOT_KINDS if k != "curves"]
            )
            written += paths
        if export.image is not None:
            written += viz.plot_vision(export, out)
        written.append(viz.save_explorer(export_path, out / "view.html"))
    return written
