"""Orbax checkpoints of the training state: parameters, optimizer state and the step.

The data position needs no state of its own: every batch is a pure function of the seed and
its step (see :func:`flaxattn.data.make_rng`), and dropout keys are ``fold_in(seed, step)``,
so ``step`` is the data iterator's position and its RNG at once. It is saved, with the seed and
config, in the JSON ``meta`` item next to the arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every ``every`` steps (and on demand), keep the newest ``keep``, restore the latest."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON metadata of the checkpoint at ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save (asynchronously; :meth:`wait` or :meth:`close` make it durable)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at ``step``, with the structure and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
