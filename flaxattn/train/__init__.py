"""flaxattn.train: the training loop, task definitions and their configurations.

    from flaxattn.train import default_config, train_and_evaluate
    results = train_and_evaluate(default_config("reverse"), "runs/reverse")

``experiments/train.py`` is the command-line front end.
"""

from flaxattn._deprecated import module_getattr
from flaxattn.train._checkpoint import Checkpointer
from flaxattn.train._config import (
    CONFIGS,
    TASK_NAMES,
    CharLMConfig,
    ClutteredConfig,
    DatesConfig,
    DigitsConfig,
    InductionConfig,
    NadarayaWatsonConfig,
    SentimentConfig,
    SequenceConfig,
    TrainConfig,
    TransformerFields,
    default_config,
    validate_config,
)
from flaxattn.train._loop import (
    EXPORT_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    draw_figures,
    lower_train_step,
    make_optimizer,
    train_and_evaluate,
)
from flaxattn.train._mesh import DATA_AXIS, training_mesh
from flaxattn.train._metrics import MetricsWriter, truncate_metrics
from flaxattn.train._registry import make_task
from flaxattn.train._restore import config_from_dict, export_checkpoint, load_run
from flaxattn.train._task import Runner, Task, exact_match, masked_cross_entropy

__all__ = [
    "CONFIGS",
    "DATA_AXIS",
    "EXPORT_FILE",
    "METRICS_FILE",
    "RESULTS_FILE",
    "TASK_NAMES",
    "CharLMConfig",
    "Checkpointer",
    "ClutteredConfig",
    "DatesConfig",
    "InductionConfig",
    "DigitsConfig",
    "MetricsWriter",
    "NadarayaWatsonConfig",
    "Runner",
    "SentimentConfig",
    "SequenceConfig",
    "Task",
    "TrainConfig",
    "TransformerFields",
    "config_from_dict",
    "default_config",
    "draw_figures",
    "exact_match",
    "export_checkpoint",
    "load_run",
    "lower_train_step",
    "training_mesh",
    "make_optimizer",
    "make_task",
    "masked_cross_entropy",
    "train_and_evaluate",
    "truncate_metrics",
    "validate_config",
]

__getattr__ = module_getattr(__name__, {"make_mesh": ("flaxattn.train._mesh", "training_mesh")})
