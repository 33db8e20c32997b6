"""Sequence-to-sequence tasks: copy / reverse / sort, and date normalisation.

Both train with teacher forcing (``tgt_in = <bos> y``, predict ``tgt_out = y <eos>``) and are
evaluated on held-out examples by greedy decoding (``exact_match``: the whole output sequence
is right) and by where cross-attention looks (``alignment``: the fraction of output tokens
whose head-averaged cross-attention argmax falls on the source token(s) they come from).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from flaxattn import analysis, data
from flaxattn.export import save_attention
from flaxattn.train._config import DatesConfig, SequenceConfig, TransformerFields
from flaxattn.train._task import (
    Batch,
    Runner,
    Task,
    exact_match,
    length_mask,
    masked_cross_entropy,
)


def transformer_config(config: TransformerFields, *, vocab_size: int, max_len: int):
    """``flaxattn.nn.TransformerConfig`` from a task config's Transformer fields."""
    from flaxattn.nn import TransformerConfig

    return TransformerConfig(
        vocab_size=vocab_size,
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        num_layers=config.num_layers,
        d_ff=config.d_ff,
        max_len=max_len,
        dropout_rate=config.dropout_rate,
        pre_ln=config.pre_ln,
        positional=config.positional,
        implementation=config.implementation,
    )


def export_kinds(kinds: dict[str, str]) -> dict[str, str]:
    """nn's ``self``/``cross`` -> export kinds: encoder self-attention is ``encoder``."""
    return {
        p: "encoder" if k == "self" and p.split("/")[0].startswith("encoder") else k
        for p, k in kinds.items()
    }


def _tokens(vocab: data.Vocab, ids: np.ndarray) -> list[list[str]]:
    return [vocab.decode(row, strip=False) for row in ids]


# Model functions run under jit by the Runner (module-level, so each compiles once).


def _transformer_logits(model, b, *, deterministic):
    return model(
        b["src"],
        b["tgt_in"],
        src_lengths=b["src_lengths"],
        tgt_lengths=b["tgt_lengths"],
        deterministic=deterministic,
    )


def _rnn_logits(model, b, *, deterministic):
    del deterministic  # the Bahdanau model has no dropout
    return model(b["src"], b["src_lengths"], b["tgt_in"])


def _greedy(model, src, src_lengths, *, max_length, bos_id):
    return model.greedy_decode(src, src_lengths, max_length=max_length, bos_id=bos_id)


class Seq2SeqTask(Task):
    """Shared by the symbol tasks and dates: subclasses supply the data and the model."""

    vocab: data.Vocab
    target_width: int  # tgt_in / tgt_out width
    rnn: bool = False

    def __init__(self, config):
        super().__init__(config)
        self.eval_set = self.batch(config.eval_examples, data.make_rng(config.seed, "eval"), "test")

    def batch(self, n: int, rng: np.random.Generator, split: str) -> Batch:
        raise NotImplementedError

    def alignment_target(self, b: Batch) -> np.ndarray:
        """``[B, T]`` source index per target position (-1: none) or ``[B, T, S]`` bool."""
        raise NotImplementedError

    def train_batch(self, step: int) -> Batch:
        return self.batch(
            self.config.batch_size, data.make_rng(self.config.seed, "train", step), "train"
        )

    def logits(self, model, b, *, deterministic: bool):
        fn = _rnn_logits if self.rnn else _transformer_logits
        return fn(model, b, deterministic=deterministic)

    def loss(self, model, b):
        logits = self.logits(model, b, deterministic=False)
        valid = length_mask(b["tgt_lengths"], b["tgt_out"].shape[1])
        loss, acc = masked_cross_entropy(logits, b["tgt_out"], valid)
        return loss, {"token_accuracy": acc}

    def _eval_loss(self, model, b):
        logits = self.logits(model, b, deterministic=True)
        valid = length_mask(b["tgt_lengths"], b["tgt_out"].shape[1])
        return masked_cross_entropy(logits, b["tgt_out"], valid)

    def _capture(self, model, b):
        from flaxattn.nn import capture_attention

        if self.rnn:
            return capture_attention(model, b["src"], b["src_lengths"], b["tgt_in"])[1]
        return capture_attention(
            model,
            b["src"],
            b["tgt_in"],
            src_lengths=b["src_lengths"],
            tgt_lengths=b["tgt_lengths"],
            deterministic=True,
        )[1]

    def predict(self, run: Runner, b: Batch) -> np.ndarray:
        return np.asarray(
            run(
                _greedy,
                b["src"],
                b["src_lengths"],
                max_length=self.target_width,
                bos_id=self.vocab.bos_id,
            )
        )

    def evaluate(self, run: Runner) -> dict[str, float]:
        b = self.eval_set
        loss, token_acc = run(self._eval_loss, b)
        pred = self.predict(run, b)
        metrics = {
            "exact_match": float(exact_match(pred, b["tgt_out"], self.vocab.eos_id).mean()),
            "token_accuracy": float(token_acc),
            "loss": float(loss),
        }
        metrics.update(self.alignment(run(self._capture, b), b))
        return metrics

    def alignment(self, captured, b: Batch) -> dict[str, float]:
        """Head-averaged cross-attention argmax accuracy: ``alignment`` for the last cross
        layer, and ``alignment/<path>`` per layer when there are several."""
        target = self.alignment_target(b)
        out = {}
        cross = [p for p, k in captured.kinds.items() if k == "cross"]
        for path in cross:
            out[f"alignment/{path}"] = analysis.alignment_accuracy(
                np.asarray(captured[path]),
                target,
                query_lengths=b["tgt_lengths"],
                key_lengths=b["src_lengths"],
                heads="mean",
            )
        if cross:
            out["alignment"] = out[f"alignment/{cross[-1]}"]
        if len(cross) == 1:  # the per-layer entry would only repeat the headline
            del out[f"alignment/{cross[0]}"]
        return out

    def encode_inputs(self, run: Runner, inputs) -> Batch:
        """Source strings -> a batch whose targets are the model's own greedy outputs."""
        width = self.eval_set["src"].shape[1]
        ids = []
        for text in inputs:
            row = self.vocab.encode(self.tokenize(text))
            if self.vocab.unk_id in row:
                bad = sorted({t for t in self.tokenize(text) if t not in self.vocab.tokens})
                raise ValueError(f"input {text!r} has tokens outside the vocabulary: {bad}")
            if not 1 <= len(row) <= width:
                raise ValueError(
                    f"input {text!r} has {len(row)} tokens; this model takes 1 to {width}"
                )
            ids.append(row)
        src, src_lengths = data.pad_batch(ids, width, self.vocab.pad_id)
        pred = self.predict(run, {"src": src, "src_lengths": src_lengths})
        outs = [
            [*row[: list(row).index(self.vocab.eos_id)], self.vocab.eos_id]
            if self.vocab.eos_id in row
            else list(row)
            for row in pred.tolist()
        ]
        tgt_out, tgt_lengths = data.pad_batch(outs, self.target_width, self.vocab.pad_id)
        tgt_in, _ = data.pad_batch(
            [[self.vocab.bos_id, *o[:-1]] for o in outs], self.target_width, self.vocab.pad_id
        )
        return {
            "src": src,
            "src_lengths": src_lengths,
            "tgt_in": tgt_in,
            "tgt_out": tgt_out,
            "tgt_lengths": tgt_lengths,
        }

    def tokenize(self, text: str) -> list[str]:
        return list(text.strip())

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        captured = jax.device_get(run(self._capture, b))
        pred = self.predict(run, b)
        strings = lambda ids: np.array(["".join(self.vocab.decode(r)) for r in ids])
        extras = {"prediction": strings(pred), "target": strings(b["tgt_out"])}
        if not user_inputs:
            extras.update(self.export_extras(b))
        return save_attention(
            path,
            layers={p: captured[p] for p in captured},
            kinds=export_kinds(captured.kinds),
            query_tokens=_tokens(self.vocab, b["tgt_in"]),
            key_tokens=_tokens(self.vocab, b["src"]),
            query_lengths=b["tgt_lengths"],
            key_lengths=b["src_lengths"],
            meta=meta,
            extras=extras,
            **bounded,
        )

    def export_extras(self, b: Batch) -> dict[str, np.ndarray]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "eval_examples": self.config.eval_examples}


class SequenceTask(Seq2SeqTask):
    """copy / reverse / sort of symbol sequences."""

    config: SequenceConfig

    def __init__(self, config: SequenceConfig):
        if config.task not in data.SEQUENCE_TASKS:
            raise ValueError(
                f"SequenceTask needs one of {data.SEQUENCE_TASKS}, got {config.task!r}"
            )
        self.vocab = data.symbol_vocab(config.num_symbols)
        self.target_width = config.max_len + 1
        super().__init__(config)

    def batch(self, n, rng, split):
        c = self.config
        return data.sequence_batch(
            c.task, n, rng=rng, vocab=self.vocab, min_len=c.min_len, max_len=c.max_len, split=split
        )

    def alignment_target(self, b):
        if self.config.task == "sort":  # any source copy of the emitted symbol will do
            src_valid = np.arange(b["src"].shape[1])[None, :] < b["src_lengths"][:, None]
            same = b["tgt_out"][:, :, None] == b["src"][:, None, :]  # [B, T, S]
            return same & src_valid[:, None, :]
        return data.expected_source_position(self.config.task, b["src"], b["src_lengths"])

    def make_model(self, rngs: nnx.Rngs):
        from flaxattn.nn import EncoderDecoderTransformer

        cfg = transformer_config(
            self.config, vocab_size=len(self.vocab), max_len=self.target_width + 1
        )
        return EncoderDecoderTransformer(cfg, attention=self.attention_fn, rngs=rngs)

    def finish(self, run: Runner, workdir) -> dict[str, Any]:
        """Which heads the task needs: the held-out loss with each head zero- and mean-ablated
        (an ``[L, N]`` table over every attention layer), in ``figures/ablation.png``."""
        return head_ablation(self, run, workdir)


def _teacher_forced_loss(model, b):
    return masked_cross_entropy(
        _transformer_logits(model, b, deterministic=True), b["tgt_out"],
        length_mask(b["tgt_lengths"], b["tgt_out"].shape[1]),
    )[0]


def head_ablation(task: Seq2SeqTask, run: Runner, workdir) -> dict[str, Any]:
    """Zero and mean ablation of every head of an encoder-decoder Transformer: the held-out
    teacher-forced loss with that head removed (``flaxattn.interp.ablate_heads``)."""
    from flaxattn import interp

    model = run.model()
    b = {k: task.eval_set[k] for k in ("src", "tgt_in", "tgt_out", "src_lengths",
                                         "tgt_lengths")}
    layers = list(interp.head_layers(model))
    clean = float(run(_teacher_forced_loss, b))
    tables = {kind: interp.ablate_heads(model, _teacher_forced_loss, b, kind=kind)
              for kind in interp.ABLATIONS}
    if task.config.figures:
        from flaxattn import viz

        names = [p.replace("/layers/", " ").replace("_attention", "") for p in layers]
        viz.plot_head_tables(
            {f"{k} ablation": v for k, v in tables.items()}, names, cmap="magma_r", vmin=0.0,
            label="held-out loss (nats)",
            title=f"{task.config.task}: held-out loss with one head ablated (none: {clean:.2g})",
            path=workdir / "figures" / "ablation.png")
    return {"ablation": {"layers": layers, "loss": clean,
                         **{k: v.tolist() for k, v in tables.items()}}}


class DatesTask(Seq2SeqTask):
    """Human-written dates -> ISO, with the Bahdanau RNN or the Transformer."""

    config: DatesConfig

    def __init__(self, config: DatesConfig):
        if config.model not in ("rnn", "transformer"):
            raise ValueError(f"model must be 'rnn' or 'transformer', got {config.model!r}")
        self.vocab = data.date_vocab()
        self.target_width = data.TARGET_LEN + 1
        self.rnn = config.model == "rnn"
        super().__init__(config)

    def batch(self, n, rng, split):
        return data.date_batch(n, rng=rng, vocab=self.vocab, split=split)

    def alignment_target(self, b):
        tgt, src = b["tgt_fields"], b["src_fields"]
        return (tgt[:, :, None] == src[:, None, :]) & (tgt[:, :, None] != data.OTHER)

    def alignment(self, captured, b: Batch) -> dict[str, float]:
        metrics = super().alignment(captured, b)
        cross = [p for p, k in captured.kinds.items() if k == "cross"]
        if cross:  # where the year / month / day digits look, field by field
            w = np.asarray(captured[cross[-1]])
            full = self.alignment_target(b)
            for field, name in data.FIELD_NAMES.items():
                only = full & (b["tgt_fields"] == field)[:, :, None]
                metrics[f"alignment_{name}"] = analysis.alignment_accuracy(
                    w, only, query_lengths=b["tgt_lengths"], key_lengths=b["src_lengths"]
                )
        return metrics

    def export_extras(self, b):
        return {"src_fields": b["src_fields"], "tgt_fields": b["tgt_fields"]}

    def make_model(self, rngs: nnx.Rngs):
        if self.rnn:
            from flaxattn.nn import BahdanauSeq2Seq

            c = self.config
            return BahdanauSeq2Seq(
                len(self.vocab), len(self.vocab), c.embed_dim, c.hidden_dim, rngs=rngs
            )
        from flaxattn.nn import EncoderDecoderTransformer

        cfg = transformer_config(
            self.config, vocab_size=len(self.vocab), max_len=data.MAX_SOURCE_LEN + 1
        )
        return EncoderDecoderTransformer(cfg, attention=self.attention_fn, rngs=rngs)
