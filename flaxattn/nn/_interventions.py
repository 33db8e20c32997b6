"""Head interventions on a whole model: ablate or scale chosen heads of chosen layers.

`MultiHeadAttention` takes `head_mask` / `head_scale` at call time; inside a model nobody
passes them, so `head_interventions` sets them on the layers for the duration of a `with`
block. Parameters are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from flax import nnx
from jaxtyping import ArrayLike

from flaxattn.nn._attention import MultiHeadAttention
from flaxattn.nn._capture import attention_layers, temporarily


@dataclasses.dataclass(frozen=True)
class HeadIntervention:
    """A layer's standing `head_mask` / `head_scale` (tuples, so the module stays hashable)."""

    mask: tuple[bool, ...] | None = None  # False ablates that head
    scale: tuple[float, ...] | None = None  # multiplies that head's output


@contextlib.contextmanager
def head_interventions(
    model: nnx.Module,
    *,
    masks: Mapping[str, Sequence[bool] | ArrayLike] | None = None,
    scales: Mapping[str, Sequence[float] | ArrayLike] | None = None,
) -> Iterator[nnx.Module]:
    """Within the block, the named attention layers ablate / scale their heads in every call.

        with head_interventions(model, masks={"decoder/layers/0/self_attention": [1, 0, 1, 1]}):
            logits = model(tokens)          # head 1 of that layer contributes nothing

    Args:
      model: the model.
      masks: `{layer path: [N] booleans}`; False zeroes that head's output.
      scales: `{layer path: [N] floats}`; multiplies each head's output.

    Layer paths are those of `attention_layers(model)`; each must be a `MultiHeadAttention`.
    A `head_mask` / `head_scale` passed to a layer call explicitly takes precedence.
    """
    masks, scales = dict(masks or {}), dict(scales or {})
    layers = {p: m for p, m in attention_layers(model).items()
              if isinstance(m, MultiHeadAttention)}
    settings = []
    for path in sorted({*masks, *scales}):
        layer = layers.get(path)
        if layer is None:
            raise ValueError(
                f"head_interventions: {path!r} is not a MultiHeadAttention layer of the model; "
                f"those are {sorted(layers)}."
            )
        mask = None if path not in masks else tuple(bool(m) for m in masks[path])
        scale = None if path not in scales else tuple(float(s) for s in scales[path])
        for name, given in (("masks", mask), ("scales", scale)):
            if given is not None and len(given) != layer.num_heads:
                raise ValueError(f"head_interventions: {name}[{path!r}] must have "
                                 f"num_heads={layer.num_heads} entries, got {len(given)}.")
        settings.append((layer, HeadIntervention(mask, scale)))
    with temporarily("intervention", settings):
        yield model
