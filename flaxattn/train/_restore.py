"""Reload a trained run from its checkpoint, and export attention from it for any inputs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaxattn.train._checkpoint import Checkpointer
from flaxattn.train._config import CONFIGS, TrainConfig
from flaxattn.train._loop import EXPORT_FILE, init_state
from flaxattn.train._mesh import training_mesh
from flaxattn.train._registry import make_task
from flaxattn.train._task import Runner, Task


def config_from_dict(saved: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with (as saved in its metadata)."""
    task = saved.get("task")
    if task not in CONFIGS:
        raise ValueError(f"the checkpoint's config names an unknown task {task!r}")
    known = {f.name for f in dataclasses.fields(CONFIGS[task])}
    return CONFIGS[task](**{k: v for k, v in saved.items() if k in known})


def load_run(
    workdir: str | os.PathLike, *, step: int | None = None
) -> tuple[TrainConfig, Task, Runner, int]:
    """``(config, task, runner, step)`` of the checkpoint at ``step`` (default: the latest)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    ckpt = Checkpointer(directory, every=0)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; steps: {steps}")
        config = config_from_dict(ckpt.restore_meta(step)["config"])
        task = make_task(config)
        graphdef, state, rest, *_ = init_state(task, config, training_mesh(1))
        state, _ = ckpt.restore(step, like=state)
    finally:
        ckpt.close()
    return config, task, Runner(graphdef, state["params"], rest), step


def export_checkpoint(
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    step: int | None = None,
    inputs: Sequence[str] | None = None,
    examples: int | None = None,
    top_k: int | None = None,
    layers: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
) -> Path:
    """Write the attention of a checkpoint for ``inputs`` (or held-out examples) to ``out``.

    Args:
      workdir: a training run's directory (with ``checkpoints/``).
      out: the ``.npz`` to write (default ``workdir/attention.npz``).
      step: the checkpoint (default: the latest).
      inputs: source strings (copy/reverse/sort symbols, a date, a sentence, a text prompt);
        default: the first ``examples`` held-out examples of the task.
      examples: how many held-out examples (default: the config's ``export_examples``).
      top_k, layers, heads: bounded export (see :func:`flaxattn.export.save_attention`).
    """
    config, task, run, step = load_run(workdir, step=step)
    out = Path(workdir) / EXPORT_FILE if out is None else Path(out)
    meta = {"task": config.task, "step": step, "config": dataclasses.asdict(config),
            "checkpoint": str(Path(workdir).absolute() / "checkpoints" / str(step))}  # fmt: skip
    path = task.export(run, out, meta, inputs=inputs, examples=examples, top_k=top_k,
                       layer_filter=layers, heads=heads)  # fmt: skip
    if path is None:
        raise ValueError(f"task {config.task!r} has nothing to export for these settings")
    return path
