"""Task name -> Task class."""

from __future__ import annotations

from flaxattn.train._config import TrainConfig


def make_task(config: TrainConfig):
    """The :class:`~flaxattn.train._task.Task` for ``config.task``."""
    from flaxattn.train import (
        _charlm,
        _classify,
        _induction,
        _nadaraya_watson,
        _seq2seq,
        _vision,
    )

    tasks = {
        "copy": _seq2seq.SequenceTask,
        "reverse": _seq2seq.SequenceTask,
        "sort": _seq2seq.SequenceTask,
        "dates": _seq2seq.DatesTask,
        "sentiment": _classify.SentimentTask,
        "charlm": _charlm.CharLMTask,
        "nadaraya_watson": _nadaraya_watson.NadarayaWatsonTask,
        "induction": _induction.InductionTask,
        "digits": _vision.ImageTask,
        "cluttered": _vision.ImageTask,
    }
    if config.task not in tasks:
        raise ValueError(f"unknown task {config.task!r}; choose from {', '.join(tasks)}")
    return tasks[config.task](config)
