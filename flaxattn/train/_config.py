"""Training configurations: one frozen dataclass per task, with defaults that solve the task.

Every default run finishes in about three minutes on a 2-core CPU. Command-line overrides are
``dataclasses.replace(config, **changes)`` (``experiments/train.py --set key=value``).

A config checks itself when it is made: every field's type against its annotation, then each
class's ``check`` (ranges, choices, and fields that must agree), so a bad value is a
``ValueError`` / ``TypeError`` naming the field, the expected and the given value, before any
work starts. A task's config extends ``check`` and calls ``super().check()``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from typing import Any


def _type_ok(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float (learning_rate=1)
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__


def at_least(config: Any, minimum: int | float, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` whose value is below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:  # `not >=` catches nan
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def one_of(config: Any, name: str, choices: Collection[str]) -> None:
    """``ValueError`` unless the field ``name`` is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every task shares: the loop, the optimizer, evaluation and output."""

    task: str = ""  # the task's name; set by the registry, not meant to be overridden
    seed: int = 0  # every random choice (data, init, dropout) derives from it
    steps: int = 1000  # optimizer steps in all (a resumed run continues up to this)
    batch_size: int = 64  # global batch; split over the 'data' mesh axis
    learning_rate: float = 3e-3  # peak learning rate (linear warm-up, then cosine decay)
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    log_every: int = 50  # write a training record every this many steps
    eval_every: int = 250  # evaluate every this many steps (and always at the end; 0: only then)
    checkpoint_every: int = (
        500  # save a checkpoint every this many steps (and at the end; 0: only then)
    )
    keep_checkpoints: int = 2  # how many checkpoints to keep
    eval_examples: int = 512  # held-out examples per evaluation
    export_examples: int = 8  # examples whose attention is exported at the end
    export_top_k: int = 0  # bounded export: keep the k largest weights per row (0: all)
    figures: bool = True  # draw figures/*.png at the end
    data_parallel: int = 0  # devices on the 'data' mesh axis (0: every device, all processes')
    mesh: str = ""  # a data x sequence mesh, e.g. "data=4,seq=2" (overrides data_parallel)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _type_ok(value, hints[field.name]):
                raise TypeError(
                    f"{field.name} must be {_type_name(hints[field.name])}, "
                    f"got {value!r} ({type(value).__name__})"
                )
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the field for a value no run can use."""
        at_least(self, 0, "seed", "steps", "warmup_steps", "weight_decay", "grad_clip",
                 "eval_every", "checkpoint_every", "export_examples", "export_top_k",
                 "data_parallel")  # fmt: skip
        at_least(self, 1, "batch_size", "log_every", "keep_checkpoints", "eval_examples")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.mesh:
            from flaxattn.train._mesh import parse_mesh

            parse_mesh(self.mesh)


@dataclasses.dataclass(frozen=True)
class TransformerFields:
    """Transformer sizes (passed to ``flaxattn.nn.TransformerConfig``)."""

    d_model: int = 64  # model width
    num_heads: int = 4  # query heads
    num_kv_heads: int | None = None  # key/value heads (None: as many as query heads; fewer: GQA)
    num_layers: int = 2  # layers (per stack for encoder-decoder models)
    d_ff: int = 128  # feed-forward hidden width
    dropout_rate: float = 0.0  # dropout in attention and feed-forward blocks
    pre_ln: bool = True  # pre-layer-norm blocks
    positional: str = "sinusoidal"  # sinusoidal, learned, rope, alibi, t5 or none
    implementation: str | None = None  # attention kernel (None: flaxattn's rule)

    def check(self) -> None:
        super().check()  # type: ignore[misc]  # the TrainConfig this is mixed into
        at_least(self, 1, "d_model", "num_heads", "num_kv_heads", "num_layers", "d_ff")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")  # fmt: skip
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        from flaxattn.nn._config import POSITIONAL

        one_of(self, "positional", POSITIONAL)
        if self.positional == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"positional='rope' needs an even head size, got d_model/num_heads="
                             f"{self.d_model // self.num_heads}")  # fmt: skip
        if self.implementation is not None:
            from flaxattn.kernels import get_implementation

            get_implementation(self.implementation)


@dataclasses.dataclass(frozen=True)
class SequenceConfig(TransformerFields, TrainConfig):
    """copy / reverse / sort with an encoder-decoder Transformer."""

    task: str = "reverse"
    num_symbols: int = 10  # distinct symbols in the sequences
    min_len: int = 4  # shortest source sequence
    max_len: int = 12  # longest source sequence
    steps: int = 1200
    num_layers: int = 1
    d_model: int = 128
    d_ff: int = 256

    def check(self) -> None:
        super().check()
        at_least(self, 1, "num_symbols", "min_len")
        if self.min_len > self.max_len:
            raise ValueError(f"need min_len <= max_len, got min_len={self.min_len}, "
                             f"max_len={self.max_len}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DatesConfig(TransformerFields, TrainConfig):
    """Date normalisation with the Bahdanau RNN seq2seq or the encoder-decoder Transformer."""

    task: str = "dates"
    model: str = "rnn"  # BahdanauSeq2Seq or EncoderDecoderTransformer
    embed_dim: int = 32  # rnn: character embedding width
    hidden_dim: int = 64  # rnn: GRU state width (encoder per direction and decoder)
    steps: int = 1500

    def check(self) -> None:
        super().check()
        one_of(self, "model", ("rnn", "transformer"))
        at_least(self, 1, "embed_dim", "hidden_dim")


@dataclasses.dataclass(frozen=True)
class SentimentConfig(TransformerFields, TrainConfig):
    """Sentiment classification with the attention RNN or a Transformer encoder."""

    task: str = "sentiment"
    model: str = "rnn"  # RNNAttentionClassifier or TransformerClassifier
    embed_dim: int = 64  # rnn: word embedding width
    hidden_dim: int = 128  # rnn: recurrent state width (32 or 64 stall near 87%: negation)
    cell: str = "gru"  # rnn: recurrent cell (gru or lstm)
    steps: int = 600

    def check(self) -> None:
        super().check()
        one_of(self, "model", ("rnn", "transformer"))
        one_of(self, "cell", ("gru", "lstm"))
        at_least(self, 1, "embed_dim", "hidden_dim")


@dataclasses.dataclass(frozen=True)
class CharLMConfig(TransformerFields, TrainConfig):
    """Character-level language model (decoder-only Transformer) on a text file."""

    task: str = "charlm"
    text: str | None = None  # the text file (None: Python standard-library sources)
    context: int = 64  # characters per training window
    d_model: int = 96
    num_layers: int = 2
    d_ff: int = 256
    steps: int = 1200
    batch_size: int = 32
    eval_examples: int = 64  # validation windows per evaluation
    sample_chars: int = 48  # new characters per sample (prompt + sample <= context stays in
    # the positions the model was trained on; beyond them it degrades)
    num_samples: int = 2  # samples generated at the end (with the KV cache)
    temperature: float = 0.8  # sampling temperature
    top_k: int = 0  # sample from the k most likely characters (0: all)

    def check(self) -> None:
        super().check()
        at_least(self, 2, "context")
        at_least(self, 0, "sample_chars", "num_samples", "top_k")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.text is not None:
            from flaxattn.data._text import read_text_file

            read_text_file(self.text)  # a missing, binary or non-UTF-8 file fails here


@dataclasses.dataclass(frozen=True)
class NadarayaWatsonConfig(TrainConfig):
    """Attention pooling: Nadaraya-Watson kernel regression, fixed and learned bandwidth."""

    task: str = "nadaraya_watson"
    learn_bandwidth: bool = True  # train the kernel's bandwidth (else: the fixed kernel only)
    n_train: int = 50  # training points (also the keys and values)
    n_test: int = 50  # test queries on a grid over [0, 5)
    noise: float = 0.5  # standard deviation of the noise on the training targets
    steps: int = 200
    learning_rate: float = 0.05
    warmup_steps: int = 0
    eval_every: int = 50
    checkpoint_every: int = 200
    export_examples: int = 1

    def check(self) -> None:
        super().check()
        at_least(self, 1, "n_train", "n_test")
        at_least(self, 0, "noise")


@dataclasses.dataclass(frozen=True)
class InductionConfig(TransformerFields, TrainConfig):
    """Induction heads: a 2-layer decoder on random tokens whose segment repeats."""

    task: str = "induction"
    vocab: int = 32  # random tokens 0..vocab-1 (first-copy loss is about ln vocab)
    context: int = 48  # model input length T (each sequence has T + 1 tokens)
    min_segment: int = 8  # shortest repeated segment
    max_segment: int = 16  # longest; random filler tokens before and after make up the rest
    attention_only: bool = True  # no feed-forward blocks (the circuit lives in the heads)
    report: bool = True  # at the end: ablation, patching, attribution, figures (interp.json)
    d_model: int = 128  # head dim 32 >= vocab: one head can copy every token
    num_heads: int = 4
    num_layers: int = 2
    positional: str = "rope"
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_every: int = 50  # often, to time the phase change
    checkpoint_every: int = 1000
    eval_examples: int = 256

    def check(self) -> None:
        super().check()
        at_least(self, 1, "vocab", "context", "min_segment")
        at_least(self, 2, "num_layers")  # the circuit needs two layers
        if not self.min_segment <= self.max_segment <= min(self.vocab, self.context // 2):
            raise ValueError(
                f"need min_segment <= max_segment <= min(vocab, context // 2) = "
                f"{min(self.vocab, self.context // 2)}, got min_segment={self.min_segment}, "
                f"max_segment={self.max_segment}"
            )


@dataclasses.dataclass(frozen=True)
class DigitsConfig(TrainConfig):
    """Image classification of scikit-learn's 8x8 digits: a ViT or a CNN with SE / CBAM."""

    task: str = "digits"
    model: str = "vit"  # vit (VisionTransformer), cnn_se or cnn_cbam (CNNClassifier)
    d_model: int = 64  # vit: model width
    num_heads: int = 4  # vit: heads
    num_layers: int = 2  # vit: encoder layers
    d_ff: int = 128  # vit: feed-forward hidden width
    dropout_rate: float = 0.0  # vit: dropout in attention and feed-forward blocks
    patch: int = 2  # vit: patch side in pixels (the image side must be a multiple)
    positional: str = "sinusoidal"  # vit: 2-D sinusoidal, learned, or relative (2-D bias)
    pool: str = "cls"  # vit: classify from the class token (cls) or the patches' mean
    implementation: str | None = None  # vit: attention kernel (None: flaxattn's rule)
    cnn_width: int = 32  # cnn: channels of the first stage (doubled at each next stage)
    cnn_stages: int = 2  # cnn: stages (2x2 average pooling between them)
    reduction: int = 4  # cnn: SE / CBAM MLP reduction
    cbam_kernel: int = 7  # cnn_cbam: odd side of the spatial attention's convolution
    shift: int = 1  # training augmentation: random shifts of up to this many pixels
    steps: int = 3000
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 1000
    checkpoint_every: int = 1000
    eval_examples: int = 360  # the whole test split of the digits (359 images)
    export_examples: int = 16

    def image_side(self) -> int:
        return 8

    def check(self) -> None:
        super().check()
        one_of(self, "model", ("vit", "cnn_se", "cnn_cbam"))
        one_of(self, "positional", ("sinusoidal", "learned", "relative"))
        one_of(self, "pool", ("cls", "mean"))
        at_least(self, 1, "d_model", "num_heads", "num_layers", "d_ff", "patch", "cnn_width",
                 "cnn_stages", "reduction", "cbam_kernel")  # fmt: skip
        at_least(self, 0, "shift")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.positional == "sinusoidal" and self.d_model % 4:
            raise ValueError(f"positional='sinusoidal' (2-D) needs d_model divisible by 4, got "
                             f"d_model={self.d_model}")  # fmt: skip
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.cbam_kernel % 2 == 0:
            raise ValueError(f"cbam_kernel must be odd, got {self.cbam_kernel}")
        side = self.image_side()
        if side % self.patch:
            raise ValueError(f"patch={self.patch} must divide the image side {side}")
        if side % (2 ** (self.cnn_stages - 1)):
            raise ValueError(f"cnn_stages={self.cnn_stages} halves the image side {side} "
                             f"too often")  # fmt: skip
        if self.implementation is not None:
            from flaxattn.kernels import get_implementation

            get_implementation(self.implementation)


@dataclasses.dataclass(frozen=True)
class ClutteredConfig(DigitsConfig):
    """Find and classify a digit on a cluttered canvas; attention scored by the pointing game."""

    task: str = "cluttered"
    canvas: int = 32  # image side in pixels
    num_clutter: int = 4  # fragments of other digits per image (outside the digit's box)
    clutter_size: int = 4  # fragment side in pixels (a crop of a digit, before digit_scale)
    digit_scale: int = 2  # the digit and fragments are enlarged this many times
    patch: int = 4
    cnn_width: int = 16  # a 32x32 canvas costs 16x the pixels of a digit
    shift: int = 0
    steps: int = 2000
    eval_examples: int = 512

    def image_side(self) -> int:
        return self.canvas

    def check(self) -> None:
        at_least(self, 1, "canvas", "clutter_size", "digit_scale")
        at_least(self, 0, "num_clutter")
        super().check()
        if self.canvas < 8 * self.digit_scale:
            raise ValueError(f"canvas must be >= 8 * digit_scale = {8 * self.digit_scale}, got "
                             f"{self.canvas}")  # fmt: skip
        if self.clutter_size > 8:
            raise ValueError(f"clutter_size must be <= 8 (a digit's side), got "
                             f"{self.clutter_size}")  # fmt: skip


CONFIGS: dict[str, type[TrainConfig]] = {
    "copy": SequenceConfig,
    "reverse": SequenceConfig,
    "sort": SequenceConfig,
    "dates": DatesConfig,
    "sentiment": SentimentConfig,
    "charlm": CharLMConfig,
    "nadaraya_watson": NadarayaWatsonConfig,
    "induction": InductionConfig,
    "digits": DigitsConfig,
    "cluttered": ClutteredConfig,
}
TASK_NAMES: tuple[str, ...] = tuple(CONFIGS)


def default_config(task: str) -> TrainConfig:
    """The default configuration of ``task``."""
    if task not in CONFIGS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    return CONFIGS[task](task=task)


def validate_config(config: TrainConfig) -> None:
    """Check ``config`` again (it checked itself when made); kept for callers of 0.1."""
    config.check()
