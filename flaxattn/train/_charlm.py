"""Character-level language modelling with the decoder-only Transformer.

Reports validation ``bits_per_char`` (cross-entropy in bits) and, at the end, writes samples
generated with the KV cache to ``samples.txt``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from flaxattn import data
from flaxattn.export import save_attention
from flaxattn.train._config import CharLMConfig
from flaxattn.train._seq2seq import transformer_config
from flaxattn.train._task import Batch, Runner, Task, length_mask, masked_cross_entropy

PROMPT_CHARS = 16  # characters of validation text that prompt each sample
EXPORT_CHARS = 48  # characters per exported example (self-attention is [T, T])
_VISIBLE = {"\n": "\\n", "\t": "\\t", " ": "\u2423"}


def _logits(model, b, *, deterministic):
    return model(b["inputs"], lengths=b["lengths"], deterministic=deterministic)


def _eval_loss(model, b):
    logits = _logits(model, b, deterministic=True)
    return masked_cross_entropy(
        logits, b["targets"], length_mask(b["lengths"], b["targets"].shape[1])
    )


def _capture(model, tokens, lengths):
    from flaxattn.nn import capture_attention

    return capture_attention(model, tokens, lengths=lengths, deterministic=True)[1]


class CharLMTask(Task):
    config: CharLMConfig

    def __init__(self, config: CharLMConfig):
        super().__init__(config)
        self.corpus = data.CharCorpus.from_text(data.load_text(config.text))
        self.vocab = self.corpus.vocab
        self.eval_set = data.sequential_windows(
            self.corpus.val_ids, config.context, config.eval_examples
        )

    def make_model(self, rngs: nnx.Rngs):
        from flaxattn.nn import DecoderLM

        c = self.config
        max_len = max(c.context, PROMPT_CHARS + c.sample_chars)
        return DecoderLM(
            transformer_config(c, vocab_size=len(self.vocab), max_len=max_len),
            attention=self.attention_fn,
            rngs=rngs,
        )

    def train_batch(self, step: int) -> Batch:
        c = self.config
        return data.char_windows(
            self.corpus.train_ids, c.batch_size, c.context, rng=data.make_rng(c.seed, "train", step)
        )

    def loss(self, model, b):
        logits = _logits(model, b, deterministic=False)
        valid = length_mask(b["lengths"], b["targets"].shape[1])
        loss, acc = masked_cross_entropy(logits, b["targets"], valid)
        return loss, {"bits_per_char": loss / math.log(2), "accuracy": acc}

    def evaluate(self, run: Runner) -> dict[str, float]:
        loss, acc = run(_eval_loss, self.eval_set)
        return {
            "bits_per_char": float(loss) / math.log(2),
            "accuracy": float(acc),
            "loss": float(loss),
        }

    def finish(self, run: Runner, workdir: Path) -> dict[str, Any]:
        """Samples from prompts of validation text, generated with the KV cache."""
        c = self.config
        if c.num_samples == 0 or c.sample_chars == 0:
            return {}
        val = self.corpus.val_ids
        width = min(PROMPT_CHARS, len(val))
        starts = np.linspace(0, len(val) - width, c.num_samples).astype(int)
        prompts = np.stack([val[s : s + width] for s in starts]).astype(np.int32)
        model = run.model()
        tokens = model.generate(
            prompts,
            c.sample_chars,
            rng=jax.random.key(c.seed),
            temperature=c.temperature,
            top_k=c.top_k or None,
            greedy=False,
        )
        tokens = np.asarray(tokens)[:, -c.sample_chars :]
        samples = []
        for prompt, new in zip(prompts, tokens, strict=True):
            samples.append(
                {
                    "prompt": "".join(self.vocab.decode(prompt, strip=False)),
                    "sample": "".join(self.vocab.decode(new, strip=False)),
                }
            )
        text = "\n\n".join(
            f"--- prompt:\n{s['prompt']}\n--- sample:\n{s['sample']}" for s in samples
        )
        (workdir / "samples.txt").write_text(text + "\n", encoding="utf-8")
        return {"samples": samples}

    def encode_inputs(self, run: Runner, inputs) -> Batch:
        """Texts -> a batch of character ids (characters outside the corpus are <unk>)."""
        limit = max(self.config.context, PROMPT_CHARS + self.config.sample_chars)
        rows = [self.vocab.encode(text) for text in inputs]
        if not all(1 <= len(r) <= limit for r in rows):
            raise ValueError(f"each input must have 1 to {limit} characters")
        inputs_, lengths = data.pad_batch(rows, max(map(len, rows)), self.vocab.pad_id)
        return {"inputs": inputs_, "lengths": lengths}

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        width = b["inputs"].shape[1] if user_inputs else min(EXPORT_CHARS, b["inputs"].shape[1])
        tokens = b["inputs"][:, :width]
        lengths = np.minimum(b["lengths"], width)
        captured = jax.device_get(run(_capture, tokens, lengths))
        chars = [
            [_VISIBLE.get(t, t) for t in self.vocab.decode(row, strip=False)] for row in tokens
        ]
        return save_attention(
            path,
            layers=dict(captured),
            kinds=dict(captured.kinds),
            query_tokens=chars,
            query_lengths=lengths,
            meta=meta,
            **bounded,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "vocab_size": len(self.vocab),
            "train_chars": len(self.corpus.train_ids),
            "val_chars": len(self.corpus.val_ids),
            "text": self.config.text or "stdlib",
        }
