"""Image tasks: ``digits`` (scikit-learn's 8x8 digits) and ``cluttered`` (a digit on a cluttered
canvas, with its box), with a Vision Transformer or a CNN with SE / CBAM attention.

On ``cluttered`` the attention is scored against the digit's box: the pointing game of the
class token's attention rollout per layer (``pointing/rollout/<layer>``), of its raw attention
in the last layer (``pointing/cls_attention``), and of each CBAM spatial map
(``pointing/spatial/<block>``), next to chance (``pointing_chance``: box area / image area).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn import analysis, data
from flaxattn.export import save_attention
from flaxattn.train._config import ClutteredConfig, DigitsConfig
from flaxattn.train._task import Batch, Runner, Task

NUM_CLASSES = 10
CLS_TOKEN = "<cls>"


def _logits(model, b, *, deterministic):
    return model(b["images"], deterministic=deterministic)


def _capture_vit(model, b):
    from flaxattn.nn import capture_attention

    logits, captured = capture_attention(model, b["images"], deterministic=True)
    return logits, dict(captured)


def _capture_cnn(model, b):
    from flaxattn.nn import capture_image_attention

    return capture_image_attention(model, b["images"], deterministic=True)


def _shift(images: np.ndarray, rng: np.random.Generator, most: int) -> np.ndarray:
    """Each image moved by up to ``most`` pixels in each direction (zeros shifted in)."""
    if most == 0:
        return images
    B, H, W = images.shape[:3]
    padded = np.pad(images, ((0, 0), (most, most), (most, most), (0, 0)))
    dy, dx = rng.integers(0, 2 * most + 1, size=(2, B))
    return np.stack([padded[i, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


class ImageTask(Task):
    """Digit classification: ``digits`` (8x8) or ``cluttered`` (a canvas with a box)."""

    config: DigitsConfig

    def __init__(self, config: DigitsConfig):
        super().__init__(config)
        self.cluttered = isinstance(config, ClutteredConfig)
        self.side = config.image_side()
        self.eval_set = self._eval_set(config.eval_examples)

    # ------------------------------------------------------------------------------ data

    def _batch(self, n: int, rng: np.random.Generator, split: str) -> Batch:
        c = self.config
        if self.cluttered:
            b = data.cluttered_batch(
                n, rng=rng, seed=c.seed, split=split, canvas=c.canvas, num_clutter=c.num_clutter,
                clutter_size=c.clutter_size, scale=c.digit_scale,
            )  # fmt: skip
        else:
            b = data.digits_batch(n, rng=rng, seed=c.seed, split=split)
        b["images"] = b["images"][..., None]  # [B, H, W, 1]
        return b

    def _eval_set(self, n: int) -> Batch:
        if self.cluttered:
            return self._batch(n, data.make_rng(self.config.seed, "eval"), "test")
        b = data.digits_test_set(self.config.seed, n)
        return {"images": b["images"][..., None], "labels": b["labels"]}

    def train_batch(self, step: int) -> Batch:
        c = self.config
        rng = data.make_rng(c.seed, "train", step)
        b = self._batch(c.batch_size, rng, "train")
        b["images"] = _shift(b["images"], rng, c.shift)
        return b

    # ----------------------------------------------------------------------------- model

    def make_model(self, rngs: nnx.Rngs):
        c = self.config
        if c.model == "vit":
            from flaxattn.nn import VisionTransformer

            return VisionTransformer(
                (self.side, self.side), c.patch, 1, NUM_CLASSES, d_model=c.d_model,
                num_heads=c.num_heads, num_layers=c.num_layers, d_ff=c.d_ff,
                dropout_rate=c.dropout_rate, positional=c.positional, pool=c.pool,
                attention=self.attention_fn or c.implementation, rngs=rngs,
            )  # fmt: skip
        from flaxattn.nn import CNNClassifier

        widths = tuple(c.cnn_width * 2**i for i in range(c.cnn_stages))
        block = "se" if c.model == "cnn_se" else "cbam"
        return CNNClassifier(1, NUM_CLASSES, widths=widths, block=block, reduction=c.reduction,
                             kernel=c.cbam_kernel, rngs=rngs)  # fmt: skip

    def loss(self, model, b):
        logits = _logits(model, b, deterministic=False).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, b["labels"][:, None], axis=-1)[:, 0]
        acc = (jnp.argmax(logits, -1) == b["labels"]).mean()
        return nll.mean(), {"accuracy": acc}

    @property
    def grid(self) -> tuple[int, int]:
        g = self.side // self.config.patch
        return g, g

    # ---------------------------------------------------------------------------- scores

    def maps(self, run: Runner, b: Batch) -> tuple[np.ndarray, dict[str, Any]]:
        """``(logits [B, K], maps)``; maps has ``layers`` (ViT weights per layer), ``rollout``
        ``[L, B, rows, cols]``, or ``channel`` / ``spatial`` (CNN blocks)."""
        if self.config.model == "vit":
            logits, captured = run(_capture_vit, b)
            layers = {p: np.asarray(w) for p, w in captured.items()}
            rollout = analysis.rollout_maps(list(layers.values()), grid=self.grid, prefix=1)
            return np.asarray(logits), {"layers": layers, "rollout": rollout}
        logits, maps = run(_capture_cnn, b)
        return np.asarray(logits), {
            kind: {p: np.asarray(v) for p, v in maps[kind].items()} for kind in maps
        }

    def pointing(self, maps: dict[str, Any], boxes: np.ndarray) -> dict[str, float]:
        """Pointing game and box IoU of every map against ``boxes``, with chance."""
        size = (self.side, self.side)
        out: dict[str, Any] = {"pointing_chance": float(analysis.pointing_chance(boxes, size)
                                                        .mean())}  # fmt: skip

        def score(name: str, m: np.ndarray) -> None:
            pixels = analysis.upsample_map(m, size)
            out[f"pointing/{name}"] = float(analysis.pointing_game(pixels, boxes).mean())
            out[f"box_iou/{name}"] = float(analysis.box_iou(pixels, boxes).mean())

        if "rollout" in maps:
            paths = list(maps["layers"])
            for path, m in zip(paths, maps["rollout"], strict=True):
                score(f"rollout/{path}", m)
            last = maps["layers"][paths[-1]].mean(axis=1)[:, 0, :]  # [B, T], heads' mean
            score("cls_attention", analysis.patch_map(last, self.grid, 1))
            out["pointing"] = out[f"pointing/rollout/{paths[-1]}"]
        for path, m in maps.get("spatial", {}).items():
            score(f"spatial/{path}", m)
            out["pointing"] = out[f"pointing/spatial/{path}"]
        if "pointing" in out:
            out["pointing_over_chance"] = out["pointing"] / out["pointing_chance"]
        return out

    def evaluate(self, run: Runner) -> dict[str, float]:
        b = self.eval_set
        logits, maps = self.maps(run, b)
        metrics: dict[str, Any] = {"accuracy": float((logits.argmax(-1) == b["labels"]).mean())}
        if self.cluttered:
            metrics.update(self.pointing(maps, b["boxes"]))
        return metrics

    # ---------------------------------------------------------------------------- export

    def write_export(self, run, b, path, meta, *, bounded, user_inputs):
        logits, maps = self.maps(run, b)
        n = len(b["labels"])
        image: dict[str, Any] = {"pixels": b["images"][..., 0]}
        if "boxes" in b:
            image["box"] = b["boxes"]
        extras = {"label": b["labels"], "prediction": logits.argmax(-1)}
        if self.config.model == "vit":
            gr, gc = self.grid
            tokens = [CLS_TOKEN] + [f"p{r},{c}" for r in range(gr) for c in range(gc)]
            image.update(grid=self.grid, patch=(self.config.patch, self.config.patch), prefix=1)
            return save_attention(
                path, layers=maps["layers"], kinds="self", query_tokens=[tokens] * n,
                key_tokens=[tokens] * n, meta=meta, extras=extras, image=image, **bounded,
            )  # fmt: skip
        return save_attention(
            path, layers={}, kinds="self", meta=meta, extras=extras, image=image,
            spatial=maps["spatial"], channel=maps["channel"],
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        split = data.digits_split(self.config.seed)
        return {
            "train_digits": len(split["train_labels"]), "test_digits": len(split["test_labels"]),
            "image_side": self.side, "eval_examples": len(self.eval_set["labels"]),
        }  # fmt: skip
