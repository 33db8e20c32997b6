"""Small attention exports for the explorer tests, written with flaxattn.export.save_attention.

Weights are softmaxes of seeded random logits, so every row is a distribution; padding and
causal cells are exactly 0, as a model's weights would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxattn.export import save_attention


def softmax_weights(rng, B, N, T, S, *, q_len=None, k_len=None, causal=False, sharp=3.0):
    """``[B, N, T, S]`` float32 rows summing to 1 over the valid keys (0 elsewhere)."""
    logits = rng.normal(size=(B, N, T, S)) * sharp
    valid = np.ones((B, 1, T, S), bool)
    if k_len is not None:
        valid &= (np.arange(S)[None, :] < np.asarray(k_len)[:, None])[:, None, None, :]
    if causal:
        valid &= np.tril(np.ones((T, S), bool))[None, None]
    logits = np.where(valid, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    if q_len is not None:
        w = np.where((np.arange(T)[None, :] < np.asarray(q_len)[:, None])[:, None, :, None], w, 0)
    return w.astype(np.float32)


def seq2seq_export(path: Path, *, top_k=None, B=3, N=4) -> Path:
    """An encoder-decoder export: 2 encoder self layers, a causal decoder self layer and a
    cross layer, with right padding on both sides."""
    rng = np.random.default_rng(0)
    src = [list("abcdefg"), list("hijkl"), list("mnopqrs")]
    tgt = [["<s>", *reversed(s)] for s in src]
    src, tgt = src[:B], tgt[:B]
    S, T = 7, 8
    k_len = np.array([len(s) for s in src])
    q_len = np.array([len(t) for t in tgt])
    layers = {
        "encoder/layers/0/attention": softmax_weights(rng, B, N, S, S, q_len=k_len, k_len=k_len),
        "encoder/layers/1/attention": softmax_weights(rng, B, N, S, S, q_len=k_len, k_len=k_len),
        "decoder/layers/0/self_attention": softmax_weights(
            rng, B, N, T, T, q_len=q_len, k_len=q_len, causal=True),
        "decoder/layers/0/cross_attention": softmax_weights(
            rng, B, N, T, S, q_len=q_len, k_len=k_len, sharp=5.0),
    }  # fmt: skip
    kinds = {p: "self" for p in layers} | {"decoder/layers/0/cross_attention": "cross"}
    return save_attention(
        path, layers=layers, kinds=kinds, query_tokens=tgt, key_tokens=src,
        query_lengths=q_len, key_lengths=k_len, meta={"task": "reverse", "step": 7},
        top_k=top_k,
    )  # fmt: skip


def classifier_export(path: Path) -> Path:
    """A classifier: an encoder self layer and a pooling layer from one <pool> query, with
    marked (sentiment) words, labels and predictions."""
    rng = np.random.default_rng(1)
    words = [["the", "film", "was", "great", "and", "moving"], ["a", "dull", "plot"]]
    k_len = np.array([6, 3])
    marked = np.array([[0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]], bool)
    layers = {
        "encoder/layers/0/attention": softmax_weights(rng, 2, 2, 6, 6, q_len=k_len, k_len=k_len),
        "pool": softmax_weights(rng, 2, 1, 1, 6, k_len=k_len),
    }
    return save_attention(
        path, layers=layers, kinds={"encoder/layers/0/attention": "self", "pool": "cross"},
        query_tokens=[["<pool>"]] * 2, key_tokens=words, key_lengths=k_len,
        meta={"task": "sentiment"},
        extras={"marked": marked, "label": np.array([1, 0]), "prediction": np.array([1, 0])},
    )  # fmt: skip


def large_export(path: Path, *, L=6, N=8, T=256, B=8) -> Path:
    """The issue's size target: L layers x N heads x T tokens x B examples of diffuse
    (hard to compress) non-causal self-attention."""
    rng = np.random.default_rng(2)
    temps = np.geomspace(0.3, 6.0, N)[None, :, None, None]
    layers = {}
    for i in range(L):
        x = (rng.standard_normal(size=(B, N, T, T), dtype=np.float32) * temps).astype(np.float32)
        x = np.exp(x - x.max(-1, keepdims=True))
        layers[f"encoder/layers/{i}/attention"] = x / x.sum(-1, keepdims=True)
    tokens = [[f"t{j}" for j in range(T)] for _ in range(B)]
    return save_attention(
        path, layers=layers, kinds="self", query_tokens=tokens, meta={"task": "large"},
        compress=False,
    )  # fmt: skip


def vit_export(path: Path) -> Path:
    """A vision transformer: 16 x 16 RGB images cut into a 4 x 4 grid of 4 x 4 patches after
    a class token, two self-attention layers of two heads, and a ground-truth box around a
    bright square."""
    rng = np.random.default_rng(3)
    B, rows, cols, patch = 2, 4, 4, 4
    T = 1 + rows * cols
    pixels = rng.uniform(0.0, 0.3, size=(B, 16, 16, 3)).astype(np.float32)
    pixels[0, 4:8, 8:12] = 1.0
    pixels[1, 8:12, 0:8] = 1.0
    box = np.array([[4, 8, 8, 12], [8, 0, 12, 8]], np.int32)
    tokens = [["<cls>"] + [f"p{k}" for k in range(rows * cols)]] * B
    layers = {f"encoder/layers/{i}/attention": softmax_weights(rng, B, 2, T, T) for i in range(2)}
    return save_attention(
        path, layers=layers, kinds="self", query_tokens=tokens, meta={"task": "vit"},
        image={"pixels": pixels, "box": box, "grid": (rows, cols), "patch": (patch, patch),
               "prefix": 1},
    )  # fmt: skip


def cnn_export(path: Path) -> Path:
    """A CNN with CBAM: no attention layers, a 4 x 4 spatial map and 8 channel weights per
    example over 12 x 12 grey images."""
    rng = np.random.default_rng(4)
    B = 2
    pixels = rng.uniform(0.0, 1.0, size=(B, 12, 12)).astype(np.float32)
    return save_attention(
        path, layers={}, kinds={}, meta={"task": "cnn"},
        image={"pixels": pixels, "box": np.array([[0, 0, 6, 6], [6, 6, 12, 12]], np.int32)},
        spatial={"cbam/spatial": rng.uniform(size=(B, 4, 4)).astype(np.float32)},
        channel={"cbam/channel": rng.uniform(size=(B, 8)).astype(np.float32)},
    )  # fmt: skip
