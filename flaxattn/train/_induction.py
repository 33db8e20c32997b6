"""Induction heads (Olsson et al. 2022): a 2-layer decoder on random tokens with a repeat.

Each sequence is ``[filler][segment][segment][filler]``: every token uniform and independent,
except that the segment is repeated; the segment's length and place vary per example, so no
fixed offset (from the query or from the end) finds the earlier copy. On the first copy the
next token cannot be predicted (loss about ln V); on the repeat it can, but only by induction:
find the earlier occurrence of the current token and copy the token after it. In a 2-layer
attention-only model this takes two heads: a layer-0 previous-token head writes "my previous
token is A" into each position, and a layer-1 induction head whose keys read it attends from a
later A to the token after the earlier A and copies it.

Evaluations record the loss on both copies and every head's induction and previous-token
scores (``flaxattn.analysis``); the end of the run measures the circuit causally (ablation,
patching, logit attribution: :mod:`flaxattn.train._induction_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn import analysis, data
from flaxattn.export import save_attention
from flaxattn.train._config import InductionConfig
from flaxattn.train._seq2seq import transformer_config
from flaxattn.train._task import Batch, Runner, Task, masked_cross_entropy


class NoFeedForward(nnx.Module):
    """Stands in for a layer's feed-forward block: adds nothing (attention-only model)."""

    def __call__(self, x, *, deterministic: bool):
        return jnp.zeros_like(x)


def induction_batch(
    n: int, rng: np.random.Generator, *, vocab: int, length: int, min_segment: int,
    max_segment: int,
) -> Batch:
    """``n`` sequences ``[filler][segment][segment][filler]`` of ``length + 1`` tokens (LM
    examples).

    Args:
      n: examples. rng: the random source. vocab: V, tokens 0..V-1.
      length: T, the model's input length (the sequence has T + 1 tokens).
      min_segment, max_segment: segment length range.

    Returns:
      ``inputs``, ``targets`` ``[n, T]`` int32 (``targets`` = inputs shifted by one);
      ``first``, ``repeat`` ``[n, T]`` bool: targets inside the first copy / the repeat that
      follow a segment token (the segment's first token is excluded from both: nothing can
      predict it); ``segment`` ``[n]`` lengths and ``start`` ``[n]`` first-copy offsets.
    """
    seqs = rng.integers(0, vocab, size=(n, length + 1))
    sizes = rng.integers(min_segment, max_segment + 1, size=n)
    starts = rng.integers(0, length + 2 - 2 * sizes)  # first copy at [a, a + P), a <= T+1-2P
    for b, (P, a) in enumerate(zip(sizes, starts, strict=True)):
        segment = rng.integers(0, vocab, size=P)
        seqs[b, a : a + 2 * P] = np.concatenate([segment, segment])
    return _as_batch(seqs, sizes, starts)


def _as_batch(seqs: np.ndarray, sizes: np.ndarray, starts: np.ndarray) -> Batch:
    n, length = seqs.shape[0], seqs.shape[1] - 1
    first = np.zeros((n, length), bool)
    repeat = np.zeros((n, length), bool)
    for b, (P, a) in enumerate(zip(sizes, starts, strict=True)):
        # target index i predicts token i + 1
        first[b, a : a + P - 1] = True
        repeat[b, a + P : a + 2 * P - 1] = True
    return {
        "inputs": seqs[:, :-1].astype(np.int32),
        "targets": seqs[:, 1:].astype(np.int32),
        "first": first,
        "repeat": repeat,
        "segment": np.asarray(sizes, np.int32),
        "start": np.asarray(starts, np.int32),
    }


CORRUPTIONS = ("first", "repeat")


def corrupt_batch(b: Batch, which: str, rng: np.random.Generator) -> Batch:
    """``b`` with the tokens of one copy of each segment shuffled (``which``: ``'first'`` or
    ``'repeat'``); filler, lengths and masks unchanged, targets those of the new sequence."""
    if which not in CORRUPTIONS:
        raise ValueError(f"which must be one of {CORRUPTIONS}, got {which!r}")
    seqs = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).copy()
    for row, (P, a) in enumerate(zip(b["segment"], b["start"], strict=True)):
        at = a if which == "first" else a + P
        seqs[row, at : at + P] = rng.permutation(seqs[row, at : at + P])
    return _as_batch(seqs, b["segment"], b["start"])


def _logits(model, b):
    return model(b["inputs"])


def half_losses(model, b) -> dict[str, jax.Array]:
    """Mean loss over all targets, the first copy and the repeat (nats), and the repeat's
    accuracy."""
    logits = _logits(model, b)
    loss, _ = masked_cross_entropy(logits, b["targets"], jnp.ones(b["targets"].shape, bool))
    first, _ = masked_cross_entropy(logits, b["targets"], b["first"])
    repeat, repeat_acc = masked_cross_entropy(logits, b["targets"], b["repeat"])
    return {"loss": loss, "first_loss": first, "repeat_loss": repeat,
            "repeat_accuracy": repeat_acc}


def repeat_loss(model, b) -> jax.Array:
    """The metric of the causal tests: the loss on the repeated half."""
    return half_losses(model, b)["repeat_loss"]


def _capture(model, tokens):
    from flaxattn.nn import capture_attention

    return capture_attention(model, tokens, deterministic=True)[1]


class InductionTask(Task):
    config: InductionConfig

    def __init__(self, config: InductionConfig):
        super().__init__(config)
        self.eval_set = self.batch(config.eval_examples, data.make_rng(config.seed, "eval"))

    def batch(self, n: int, rng: np.random.Generator) -> Batch:
        c = self.config
        return induction_batch(n, rng, vocab=c.vocab, length=c.context,
                               min_segment=c.min_segment, max_segment=c.max_segment)

    def make_model(self, rngs: nnx.Rngs):
        from flaxattn.nn import DecoderLM

        c = self.config
        model = DecoderLM(transformer_config(c, vocab_size=c.vocab, max_len=c.context),
                          attention=self.attention_fn, rngs=rngs)
        if c.attention_only:
            for layer in model.decoder.layers:
                layer.feed_forward = NoFeedForward()
        return model

    def train_batch(self, step: int) -> Batch:
        c = self.config
        b = self.batch(c.batch_size, data.make_rng(c.seed, "train", step))
        return {k: b[k] for k in ("inputs", "targets", "first", "repeat")}

    def loss(self, model, b):
        metrics = half_losses(model, b)
        return metrics.pop("loss"), metrics

    def layer_paths(self) -> list[str]:
        return [f"decoder/layers/{i}/self_attention" for i in range(self.config.num_layers)]

    def scores(self, captured, tokens) -> dict[str, np.ndarray]:
        """``pattern_scores`` of the captured layers, in layer order: ``{score: [L, N]}``."""
        layers = {p: np.asarray(captured[p]) for p in self.layer_paths()}
        return analysis.pattern_scores(layers, tokens)

    def evaluate(self, run: Runner) -> dict[str, Any]:
        b = self.eval_set
        losses = {k: float(v) for k, v in run(half_losses, b).items()}
        scores = self.scores(jax.device_get(run(_capture, b["inputs"])), b["inputs"])
        induction, previous = scores["induction"], scores["previous_token"]
        return {
            **losses,
            "repeat_over_first": losses["repeat_loss"] / losses["first_loss"],
            "induction_max": float(np.nanmax(induction[1:])) if len(induction) > 1 else np.nan,
            "previous_token_max": float(np.nanmax(previous[0])),
            # every head's scores, [L][N] (lists: not drawn as curves by plot_training_curves)
            "induction": induction.round(4).tolist(),
            "previous_token": previous.round(4).tolist(),
        }

    def finish(self, run: Runner, workdir: Path) -> dict[str, Any]:
        if not self.config.report:
            return {}
        from flaxattn.train._induction_report import induction_report

        return induction_report(self, run, workdir)

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        captured = jax.device_get(run(_capture, b["inputs"]))
        tokens = [[str(t) for t in row] for row in b["inputs"]]
        return save_attention(path, layers=dict(captured), kinds=dict(captured.kinds),
                              query_tokens=tokens, meta=meta, **bounded)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"vocab_size": c.vocab, "context": c.context,
                "segment": [c.min_segment, c.max_segment],
                "uniform_loss": float(np.log(c.vocab))}
