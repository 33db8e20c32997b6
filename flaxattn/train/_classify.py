"""Sentiment classification on the generated corpus, with attention scored against the
sentiment-bearing words (``attention_mass_on_sentiment`` next to ``uniform_baseline``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn import analysis, data
from flaxattn.export import save_attention
from flaxattn.train._config import SentimentConfig
from flaxattn.train._seq2seq import transformer_config
from flaxattn.train._task import Batch, Runner, Task, masked_cross_entropy

NUM_CLASSES = 2
POOL_TOKEN = "<pool>"


def _logits(model, b, *, deterministic):
    return model(b["tokens"], b["lengths"], deterministic=deterministic)


def _capture(model, b):
    from flaxattn.nn import capture_attention

    logits, captured = capture_attention(model, b["tokens"], b["lengths"], deterministic=True)
    return logits, captured


def _is_pool(weights) -> bool:
    """An attention-pooling layer has one query per example: ``[B, N, 1, S]``."""
    return np.shape(weights)[2] == 1


class SentimentTask(Task):
    """Binary sentiment of generated sentences (1 positive, 0 negative)."""

    config: SentimentConfig

    def __init__(self, config: SentimentConfig):
        if config.model not in ("rnn", "transformer"):
            raise ValueError(f"model must be 'rnn' or 'transformer', got {config.model!r}")
        super().__init__(config)
        self.vocab = data.sentiment_vocab()
        self.eval_set = data.sentiment_batch(
            config.eval_examples,
            rng=data.make_rng(config.seed, "eval"),
            vocab=self.vocab,
            split="test",
        )

    def make_model(self, rngs: nnx.Rngs):
        c = self.config
        if c.model == "rnn":
            from flaxattn.nn import RNNAttentionClassifier

            return RNNAttentionClassifier(
                len(self.vocab), c.embed_dim, c.hidden_dim, NUM_CLASSES, cell=c.cell, rngs=rngs
            )
        from flaxattn.nn import TransformerClassifier

        cfg = transformer_config(c, vocab_size=len(self.vocab), max_len=data.MAX_WORDS + 1)
        return TransformerClassifier(cfg, NUM_CLASSES, attention=self.attention_fn, rngs=rngs)

    def train_batch(self, step: int) -> Batch:
        c = self.config
        return data.sentiment_batch(
            c.batch_size, rng=data.make_rng(c.seed, "train", step), vocab=self.vocab, split="train"
        )

    def loss(self, model, b):
        logits = _logits(model, b, deterministic=False)
        valid = jnp.ones(b["labels"].shape, bool)
        loss, acc = masked_cross_entropy(logits, b["labels"], valid)
        return loss, {"accuracy": acc}

    def attention_mass(self, captured, b: Batch) -> dict[str, float]:
        """Mass on sentiment words per layer; the headline number is the pooling layer's (if
        any), else the last layer's."""
        marked = b["marks"] == data.MARK_SENTIMENT
        out: dict[str, Any] = {}
        for path in captured:
            w = np.asarray(captured[path])
            ql = np.ones_like(b["lengths"]) if _is_pool(w) else b["lengths"]
            mm = analysis.marked_token_mass(w, marked, query_lengths=ql, key_lengths=b["lengths"])
            out[f"attention_mass_on_sentiment/{path}"] = mm.mean_mass
            out["uniform_baseline"] = mm.baseline
        pools = [p for p in captured if _is_pool(captured[p])]
        headline = pools[-1] if pools else (list(captured)[-1] if captured else None)
        if headline is not None:
            out["attention_mass_on_sentiment"] = out[f"attention_mass_on_sentiment/{headline}"]
            out["attention_layer"] = headline
            # A left-to-right RNN state knows a word only from that word on, so its pooling
            # often looks one token later; this shows how much.
            after = np.zeros_like(marked)
            after[:, 1:] = marked[:, :-1]
            w = np.asarray(captured[headline])
            ql = np.ones_like(b["lengths"]) if _is_pool(w) else b["lengths"]
            out["attention_mass_after_sentiment"] = analysis.marked_token_mass(
                w, after, query_lengths=ql, key_lengths=b["lengths"]
            ).mean_mass
        if len(captured) == 1:  # the per-layer entry would only repeat the headline
            del out[f"attention_mass_on_sentiment/{headline}"]
        return out

    def evaluate(self, run: Runner) -> dict[str, float]:
        b = self.eval_set
        logits, captured = run(_capture, b)
        logits = np.asarray(logits)
        metrics: dict[str, Any] = {
            "accuracy": float((logits.argmax(-1) == b["labels"]).mean()),
        }
        metrics.update(self.attention_mass(captured, b))
        return metrics

    def encode_inputs(self, run: Runner, inputs) -> Batch:
        """Sentences -> a batch; sentiment marks from the generator's word lists, label -1."""
        polar = set(data.POSITIVE_WORDS) | set(data.NEGATIVE_WORDS)
        rows, marks = [], []
        for text in inputs:
            words = data.word_tokenize(text.lower())
            if not 1 <= len(words) <= data.MAX_WORDS:
                raise ValueError(f"input {text!r} has {len(words)} words; 1 to {data.MAX_WORDS}")
            rows.append(self.vocab.encode(words))
            marks.append([data.MARK_SENTIMENT if w in polar else data.MARK_NONE for w in words])
        tokens, lengths = data.pad_batch(rows, data.MAX_WORDS, self.vocab.pad_id)
        marks, _ = data.pad_batch(marks, data.MAX_WORDS, data.MARK_NONE)
        labels = np.full((len(rows),), -1, np.int32)
        return {"tokens": tokens, "lengths": lengths, "labels": labels, "marks": marks}

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        n = len(b["tokens"])
        logits, captured = run(_capture, b)
        words = [self.vocab.decode(row, strip=False) for row in b["tokens"]]
        layers = {p: np.asarray(captured[p]) for p in captured}
        # Self-attention over the words is 'encoder' (queries and keys are key_tokens); a
        # pooling layer is 'cross' from the single <pool> query to the words.
        kinds = {p: "cross" if _is_pool(w) else "encoder" for p, w in layers.items()}
        return save_attention(
            path,
            layers=layers,
            kinds=kinds,
            query_tokens=[[POOL_TOKEN]] * n,
            key_tokens=words,
            key_lengths=b["lengths"],
            meta=meta,
            extras={
                "marked": b["marks"] == data.MARK_SENTIMENT,
                "negation": b["marks"] == data.MARK_NEGATION,
                "label": b["labels"],
                "prediction": np.asarray(logits).argmax(-1),
            },
            **bounded,
        )

    def describe(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "eval_examples": self.config.eval_examples}
