"""Attention exports: the ``.npz`` file format, an atomic writer and a validating loader.

An export holds the attention weights of every layer and head of a model for a batch of ``B``
examples, with the token strings and valid lengths needed to read them. It is a plain ``.npz``
(no pickles: ``np.load(path, allow_pickle=False)`` reads it). Entries:

========================  =============  =====================================================
entry                     shape / dtype  meaning
========================  =============  =====================================================
``format``                str            ``"flaxattn.attention"``, marks a flaxattn export
``format_version``        int            ``2`` (files of version ``1`` are read too)
``layer_paths``           [L] str        layer names (module paths), in model order
``kind/<path>``           str            ``"self"``, ``"cross"`` or ``"encoder"`` (see below)
``layer/<path>``          [B,N,T,S] f32  weights; ``float16`` if saved with ``dtype=float16``
``topk_values/<path>``    [B,N,T,k]      bounded mode: the k largest weights of each row,
``topk_indices/<path>``   [B,N,T,k] i32  in decreasing order, and their key indices
``heads/<path>``          [N] int        original indices of the stored heads
``query_tokens``          [B,T] str      the query-side sequence (decoder / only sequence)
``query_lengths``         [B] int        valid query tokens per example (right padding)
``key_tokens``            [B,S] str      the source sequence (encoder side); optional
``key_lengths``           [B] int        valid source tokens per example; with key_tokens
``extra/<name>``          [B,...]        optional per-example arrays, e.g. ``extra/marked``
                                         ([B,S] or [B,T] bool: tokens to highlight, such as
                                         sentiment words), ``extra/label``, ``extra/prediction``
``meta``                  str (JSON)     ``task``, ``config`` (dict), ``step`` (checkpoint step),
                                         ``flaxattn_version``, ``created`` (UTC, ISO 8601), ...
``image/pixels``          [B,Hi,Wi] or   the input image of each example, float32 in [0, 1]
                          [B,Hi,Wi,C]    (version 2; every ``image/*`` entry is optional)
``image/box``             [B,4] i32      ground-truth box (top, left, bottom, right) in pixels,
                                         bottom and right exclusive
``image/grid``            [2] i32        patch grid (rows, cols) of the transformer's token axis
``image/patch``           [2] i32        patch size in pixels (rows, cols); grid * patch covers
                                         the image
``image/prefix``          [] i32         non-patch tokens before the patches on the token axis
                                         (1 for a class token)
``spatial/<path>``        [B,h,w] f32    a spatial attention map of module ``<path>`` (CBAM),
                                         over the whole image (``h x w`` cells)
``channel/<path>``        [B,C] f32      channel attention weights of module ``<path>`` (SE,
                                         CBAM's channel attention)
========================  =============  =====================================================

Images (version 2). Axis letters: ``Hi, Wi`` image height and width in pixels, ``C``
channels, ``h, w`` the cells of a spatial map. A patch token ``prefix + r * cols + c`` covers
pixels ``[r*pr, (r+1)*pr) x [c*pc, (c+1)*pc)`` where ``(pr, pc)`` is ``image/patch``. An export
may hold only ``spatial/``/``channel/`` maps and no layers (a CNN with SE or CBAM blocks);
its ``query_tokens`` are then ``[B, 0]``. ``image/grid`` and ``image/patch`` come together or
not at all (a CNN has no token axis).

A layer is stored either dense (``layer/<path>``) or, in bounded mode, top-k
(``topk_values/<path>`` + ``topk_indices/<path>``); the key axis length ``S`` of a top-k layer
follows from its kind. The kind says which tokens the two axes of a layer refer to:

- ``self``: queries and keys are ``query_tokens`` (T = S), e.g. a decoder or an LM;
- ``cross``: queries are ``query_tokens``, keys are ``key_tokens`` (encoder-decoder attention, a
  Bahdanau decoder, or attention pooling with a single query token such as ``<pool>``);
- ``encoder``: self-attention inside the encoder: queries and keys are ``key_tokens`` (T = S).
  ``save_attention`` stores a ``self`` layer under a module named ``encoder*`` as ``encoder``
  when ``key_tokens`` are given, so the kinds of ``flaxattn.nn.capture_attention`` can be
  passed unchanged.

Use :func:`save_attention` to write (atomically: a temporary file in the same directory, then
``os.replace``) and :func:`load_attention` to read back an :class:`AttentionExport`. Version-1
files load unchanged, with ``image=None`` and no spatial or channel maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import tempfile
import types
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxattn.analysis import topk_compress, topk_decompress

__all__ = [
    "AttentionExport",
    "ExportFormatError",
    "ExportImage",
    "KINDS",
    "load_attention",
    "save_attention",
]

FORMAT = "flaxattn.attention"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("self", "cross", "encoder")


class ExportFormatError(ValueError):
    """The file is not a (valid) flaxattn attention export."""


@dataclasses.dataclass(frozen=True)
class ExportImage:
    """The images of an export and where the token axis sits on them (format version 2).

    Attributes:
      pixels: ``[B, Hi, Wi]`` or ``[B, Hi, Wi, C]`` float32 in [0, 1].
      box: ``[B, 4]`` int32 ground-truth boxes ``(top, left, bottom, right)``, bottom and
        right exclusive, or None.
      grid: ``(rows, cols)`` of the patch tokens, or None when no layer has a patch axis.
      patch: ``(pr, pc)`` pixels per patch, or None (with ``grid``).
      prefix: tokens before the patches on the token axis (1 for a class token).
    """

    pixels: np.ndarray
    box: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    patch: tuple[int, int] | None = None
    prefix: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """``(Hi, Wi)``: image height and width in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    @property
    def num_patches(self) -> int:
        """``rows * cols`` (0 without a grid)."""
        return 0 if self.grid is None else self.grid[0] * self.grid[1]


def _pair(value, name: str) -> tuple[int, int]:
    arr = np.asarray(value)
    if arr.shape != (2,) or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 1:
        raise ValueError(f"{name} must be 2 positive integers (rows, cols), got {value!r}")
    return int(arr[0]), int(arr[1])


def _check_image(image: ExportImage | Mapping[str, Any], B: int | None) -> ExportImage:
    """Validate and normalise the image entries (dtypes, ranges, geometry); B may be None."""
    if isinstance(image, Mapping):
        unknown = set(image) - {"pixels", "box", "grid", "patch", "prefix"}
        if unknown:
            raise ValueError(f"image has unknown keys {sorted(unknown)}")
        if "pixels" not in image:
            raise ValueError("image needs 'pixels' ([B, Hi, Wi] or [B, Hi, Wi, C] in [0, 1])")
        # Raw values (arrays read from a file) are normalised below, not put in an ExportImage.
        image = types.SimpleNamespace(**{"box": None, "grid": None, "patch": None, "prefix": 0,
                                         **image})  # fmt: skip
    elif not isinstance(image, ExportImage):
        raise TypeError(f"image must be an ExportImage or a mapping, got {type(image).__name__}")
    pixels = np.asarray(image.pixels)
    if pixels.ndim not in (3, 4) or not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(
            f"image pixels must be float [B, Hi, Wi] or [B, Hi, Wi, C], got {pixels.shape} "
            f"{pixels.dtype}"
        )
    if B is not None and pixels.shape[0] != B:
        raise ValueError(f"image pixels have {pixels.shape[0]} examples, expected {B}")
    if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise ValueError(f"image pixels must lie in [0, 1], got [{pixels.min()}, {pixels.max()}]")
    Bp, Hi, Wi = pixels.shape[:3]
    box = None
    if image.box is not None:
        box = np.asarray(image.box)
        if box.shape != (Bp, 4) or not np.issubdtype(box.dtype, np.integer):
            raise ValueError(f"image box must be [B={Bp}, 4] integers, got {box.shape} {box.dtype}")
        top, left, bottom, right = box.T
        if not ((top >= 0) & (top < bottom) & (bottom <= Hi)
                & (left >= 0) & (left < right) & (right <= Wi)).all():  # fmt: skip
            raise ValueError(
                f"image box rows must be (top, left, bottom, right) with 0 <= top < bottom <= "
                f"{Hi} and 0 <= left < right <= {Wi}, got {box.tolist()}"
            )
        box = box.astype(np.int32)
    if (image.grid is None) != (image.patch is None):
        raise ValueError("image grid and patch come together (or neither)")
    grid = patch = None
    if image.grid is not None:
        grid, patch = _pair(image.grid, "image grid"), _pair(image.patch, "image patch")
        for axis, n, p, size in (("rows", grid[0], patch[0], Hi), ("cols", grid[1], patch[1], Wi)):
            # Patches cover the image, and each one starts inside it.
            if not n * p >= size > (n - 1) * p:
                raise ValueError(
                    f"image grid x patch must cover the image: {axis} {n} x {p} pixels for an "
                    f"image of {size}"
                )
    prefix = image.prefix
    if isinstance(prefix, np.ndarray) and prefix.ndim == 0:
        prefix = prefix.item()
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or prefix < 0:
        raise ValueError(f"image prefix must be a non-negative int, got {image.prefix!r}")
    return ExportImage(pixels.astype(np.float32), box, grid, patch, int(prefix))


def _maps(maps: Mapping[str, Any] | None, name: str, ndim: int) -> dict[str, np.ndarray]:
    """``{path: float32 array}`` of rank ``ndim``, for the spatial / channel maps."""
    out = {}
    for path, value in (maps or {}).items():
        arr = np.asarray(value)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{name} paths must be non-empty strings, got {path!r}")
        if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.floating):
            shape = "[B, h, w]" if ndim == 3 else "[B, C]"
            raise ValueError(f"{name}[{path!r}] must be float {shape}, got {arr.shape} {arr.dtype}")
        out[path] = arr.astype(np.float32)
    return out


def _version() -> str:
    try:
        from flaxattn import __version__

        return __version__
    except ImportError:  # pragma: no cover - partially initialised package
        return "unknown"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return repr(obj)


def _tokens(tokens, name: str, B: int | None = None) -> np.ndarray:
    """A ``[B, L]`` unicode array from an array or a list of (possibly ragged) lists."""
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind == "U":
        arr = tokens
    else:
        rows = [list(map(str, row)) for row in tokens]
        width = max((len(r) for r in rows), default=0)
        arr = np.array([r + [""] * (width - len(r)) for r in rows], dtype=str).reshape(
            len(rows), width
        )
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [B, length], got shape {arr.shape}")
    if B is not None and arr.shape[0] != B:
        raise ValueError(f"{name} has {arr.shape[0]} examples, the weights have {B}")
    return arr


def _lengths(lengths, name: str, B: int, L: int) -> np.ndarray:
    if lengths is None:
        return np.full((B,), L, dtype=np.int32)
    arr = np.asarray(lengths).reshape(-1)
    if arr.shape != (B,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be [B={B}] integers, got {arr.shape} {arr.dtype}")
    if arr.min(initial=0) < 0 or arr.max(initial=0) > L:
        raise ValueError(f"{name} must lie in [0, {L}], got {arr.tolist()}")
    return arr.astype(np.int32)


def _select_layers(paths: list[str], layer_filter) -> list[str]:
    if layer_filter is None:
        return paths
    if callable(layer_filter):
        chosen = [p for p in paths if layer_filter(p)]
    else:
        patterns = [layer_filter] if isinstance(layer_filter, str) else list(layer_filter)
        chosen = [p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"layer_filter {layer_filter!r} selects no layer; layers: {paths}")
    return chosen


def _under_encoder(path: str) -> bool:
    return any(part.lower().startswith("encoder") for part in path.split("/")[:-1])


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray], compress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_attention(
    path: str | os.PathLike,
    *,
    layers: Mapping[str, Any],
    kinds: Mapping[str, str] | str,
    query_tokens=None,
    key_tokens=None,
    query_lengths=None,
    key_lengths=None,
    meta: Mapping[str, Any] | None = None,
    top_k: int | None = None,
    layer_filter: str | Iterable[str] | Callable[[str], bool] | None = None,
    heads: int | Sequence[int] | None = None,
    dtype: Any = np.float32,
    stored_heads: Sequence[int] | None = None,
    extras: Mapping[str, Any] | None = None,
    image: ExportImage | Mapping[str, Any] | None = None,
    spatial: Mapping[str, Any] | None = None,
    channel: Mapping[str, Any] | None = None,
    compress: bool = True,
) -> Path:
    """Write an attention export (schema in the module docstring) atomically; return its path.

    ``layers``: ``{path: [B, N, T, S]}`` in model order, or ``{path: (values, indices)}`` for
    top-k weights already computed (e.g. by ``flaxattn.nn.capture_attention(top_k=...)``);
    ``kinds``: ``{path: kind}`` or one kind for all. A ``"self"`` layer inside a module whose
    name starts with ``encoder`` (e.g. ``encoder/layers/0/attention``) is stored as
    ``"encoder"`` when ``key_tokens`` are given. Token arrays may be ragged lists (padded with
    ``""``); lengths default to full.

    Bounded mode: ``layer_filter`` (glob pattern(s) or a predicate on the path) keeps some
    layers, ``heads`` (an index or indices) some heads, and ``top_k`` stores only the k largest
    weights per row (dense layers with ``S <= top_k`` stay dense). ``stored_heads`` names the
    original heads when the arrays hold a subset already. ``meta`` is JSON-encoded; ``task``,
    ``config`` and ``step`` belong in it, ``flaxattn_version`` and ``created`` are added.

    Images (format version 2): ``image`` is an :class:`ExportImage` or a mapping with its
    fields (``pixels [B, Hi, Wi(, C)]`` in [0, 1], optional ``box [B, 4]``, ``grid`` and
    ``patch`` (rows, cols) and ``prefix``); ``spatial`` is ``{module path: [B, h, w]}`` and
    ``channel`` ``{module path: [B, C]}``. With spatial or channel maps, ``layers`` may be
    empty and ``query_tokens`` omitted (a CNN has no tokens).
    """
    path = Path(path)
    layers = dict(layers or {})
    spatial_maps = _maps(spatial, "spatial", 3)
    channel_maps = _maps(channel, "channel", 2)
    if not layers and not spatial_maps and not channel_maps:
        raise ValueError("layers is empty (and no spatial or channel maps): nothing to export")
    if not layers:
        if query_tokens is not None or key_tokens is not None:
            raise ValueError("query_tokens / key_tokens given without attention layers")
        B = next(iter({**spatial_maps, **channel_maps}.values())).shape[0]
        return _save_maps_only(path, B, image, spatial_maps, channel_maps, extras, meta, compress)
    if query_tokens is None:
        raise ValueError("query_tokens is required with attention layers")
    paths = _select_layers(list(layers), layer_filter)
    kind_of = {p: kinds for p in paths} if isinstance(kinds, str) else dict(kinds)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    if top_k is not None and (isinstance(top_k, bool) or not int(top_k) == top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")

    first = layers[paths[0]]
    first = np.shape(first[0] if isinstance(first, (tuple, list)) else first)
    if len(first) != 4:
        raise ValueError(f"layer {paths[0]!r} must be [B, N, T, S], got shape {first}")
    B = first[0]
    q_tok = _tokens(query_tokens, "query_tokens", B)
    k_tok = None if key_tokens is None else _tokens(key_tokens, "key_tokens", B)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION),
        "layer_paths": np.array(paths, dtype=str),
        "query_tokens": q_tok,
        "query_lengths": _lengths(query_lengths, "query_lengths", B, q_tok.shape[1]),
    }
    if k_tok is not None:
        arrays["key_tokens"] = k_tok
        arrays["key_lengths"] = _lengths(key_lengths, "key_lengths", B, k_tok.shape[1])
    elif key_lengths is not None:
        raise ValueError("key_lengths given without key_tokens")

    for p in paths:
        kind = kind_of.get(p)
        if kind not in KINDS:
            raise ValueError(f"kind of layer {p!r} must be one of {KINDS}, got {kind!r}")
        if kind == "self" and k_tok is not None and _under_encoder(p):
            kind = "encoder"
        if kind != "self" and k_tok is None:
            raise ValueError(f"layer {p!r} is {kind!r}: its keys are key_tokens, which is None")
        T = (k_tok if kind == "encoder" else q_tok).shape[1]
        S = (q_tok if kind == "self" else k_tok).shape[1]
        value = layers[p]
        pair = isinstance(value, (tuple, list)) and len(value) == 2
        parts = [np.asarray(x) for x in value] if pair else [np.asarray(value)]
        w = parts[0]
        if w.ndim != 4 or w.shape[0] != B:
            raise ValueError(f"layer {p!r} must be [B={B}, N, T, S], got shape {w.shape}")
        if pair:
            if parts[1].shape != w.shape or w.shape[2] != T or w.shape[3] > S:
                raise ValueError(
                    f"layer {p!r} ({kind}): top-k values {w.shape} and indices {parts[1].shape} "
                    f"must both be [B, N, {T}, k <= {S}]"
                )
            if parts[1].size and (parts[1].min() < 0 or parts[1].max() >= S):
                raise ValueError(f"layer {p!r}: top-k indices out of range [0, {S})")
        elif w.shape[2:] != (T, S):
            raise ValueError(
                f"layer {p!r} ({kind}) has shape {w.shape}; its tokens give [B, N, T, S] = "
                f"[{B}, N, {T}, {S}]"
            )
        arrays[f"kind/{p}"] = np.array(kind)
        original = np.arange(w.shape[1])
        if stored_heads is not None:
            original = np.asarray(stored_heads, dtype=np.int64).reshape(-1)
            if original.shape != (w.shape[1],):
                raise ValueError(
                    f"stored_heads has {original.size} entries, layer {p!r} {w.shape[1]}"
                )
        if heads is not None:
            idx = np.atleast_1d(np.asarray(heads)).astype(np.int64)
            if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= w.shape[1]:
                raise ValueError(f"heads {heads!r} out of range for layer {p!r} with {w.shape[1]}")
            parts, original = [x[:, idx] for x in parts], original[idx]
        if heads is not None or stored_heads is not None:
            arrays[f"heads/{p}"] = original
        if pair:
            v, i = parts[0].astype(dtype), parts[1].astype(np.int32)
            if top_k is not None and int(top_k) < v.shape[-1]:
                v, i = v[..., : int(top_k)], i[..., : int(top_k)]
            arrays[f"topk_values/{p}"], arrays[f"topk_indices/{p}"] = v, i
        elif top_k is not None and int(top_k) < S:
            w = parts[0].astype(dtype)
            arrays[f"topk_values/{p}"], arrays[f"topk_indices/{p}"] = topk_compress(w, int(top_k))
        else:
            arrays[f"layer/{p}"] = parts[0].astype(dtype)

    token_axes = []  # (path, tokens on the key axis) of the layers over the image's patches
    for p in paths:
        kind = str(arrays[f"kind/{p}"])
        if kind != "cross":
            token_axes.append((p, (q_tok if kind == "self" else k_tok).shape[1]))
    _add_images(arrays, B, image, spatial_maps, channel_maps, token_axes)
    _add_extras(arrays, extras)
    bounded = {
        "top_k": None if top_k is None else int(top_k),
        "layer_filter": layer_filter if isinstance(layer_filter, (str, type(None))) else paths,
        "heads": None if heads is None else np.atleast_1d(heads).tolist(),
    }
    arrays["meta"] = _meta(meta, bounded)
    _atomic_savez(path, arrays, compress)
    return path


def _save_maps_only(path, B, image, spatial_maps, channel_maps, extras, meta, compress) -> Path:
    """An export of spatial / channel maps without attention layers (a CNN)."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION),
        "layer_paths": np.array([], dtype=str),
        "query_tokens": np.zeros((B, 0), dtype=str),
        "query_lengths": np.zeros((B,), dtype=np.int32),
    }
    _add_images(arrays, B, image, spatial_maps, channel_maps, [])
    _add_extras(arrays, extras)
    arrays["meta"] = _meta(meta, {"top_k": None, "layer_filter": None, "heads": None})
    _atomic_savez(path, arrays, compress)
    return path


def _add_images(arrays, B, image, spatial_maps, channel_maps, token_axes) -> None:
    """Validate the version-2 entries against the batch and the token axes, and add them."""
    for name, maps in (("spatial", spatial_maps), ("channel", channel_maps)):
        for p, arr in maps.items():
            if arr.shape[0] != B:
                raise ValueError(f"{name}[{p!r}] has {arr.shape[0]} examples, expected {B}")
            arrays[f"{name}/{p}"] = arr
    if image is None:
        return
    image = _check_image(image, B)
    arrays["image/pixels"] = image.pixels
    if image.box is not None:
        arrays["image/box"] = image.box
    if image.grid is not None:
        arrays["image/grid"] = np.array(image.grid, np.int32)
        arrays["image/patch"] = np.array(image.patch, np.int32)
        for p, length in token_axes:
            if image.prefix + image.num_patches > length:
                raise ValueError(
                    f"layer {p!r} has {length} tokens, fewer than image prefix "
                    f"{image.prefix} + grid {image.grid[0]} x {image.grid[1]} patches"
                )
    arrays["image/prefix"] = np.array(image.prefix, np.int32)


def _add_extras(arrays, extras) -> None:
    for name, value in (extras or {}).items():
        v = np.asarray(value)
        if v.dtype == object:
            raise ValueError(f"extras[{name!r}] must be a numeric, bool or str array")
        arrays[f"extra/{name}"] = v


def _meta(meta, bounded) -> np.ndarray:
    info = dict(meta or {})
    for key in ("task", "config", "step"):
        info.setdefault(key, None)
    info.setdefault("flaxattn_version", _version())
    info.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    info["bounded"] = bounded
    return np.array(json.dumps(info, default=_json_default, sort_keys=True))


class _Layers(Mapping):
    """Read-only ``{path: [B, N, T, S] weights}``; top-k layers are densified on access."""

    def __init__(self, export: AttentionExport):
        self._x = export

    def __getitem__(self, path: str) -> np.ndarray:
        x = self._x
        if path in x.dense:
            return x.dense[path]
        if path in x.topk_values:
            return topk_decompress(x.topk_values[path], x.topk_indices[path], x.num_keys(path))
        raise KeyError(f"no layer {path!r}; layers: {list(x.paths)}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._x.paths)

    def __len__(self) -> int:
        return len(self._x.paths)

    def __repr__(self) -> str:
        return f"<layers {list(self._x.paths)}>"


@dataclasses.dataclass(frozen=True)
class AttentionExport:
    """A loaded export. ``layers[path]`` gives dense ``[B, N, T, S]`` float32 weights;
    ``image``, ``spatial`` and ``channel`` hold the version-2 entries (None / empty in a
    version-1 file)."""

    paths: tuple[str, ...]
    kinds: dict[str, str]
    dense: dict[str, np.ndarray]
    topk_values: dict[str, np.ndarray]
    topk_indices: dict[str, np.ndarray]
    heads: dict[str, np.ndarray]
    query_tokens: np.ndarray
    key_tokens: np.ndarray | None
    query_lengths: np.ndarray
    key_lengths: np.ndarray | None
    extras: dict[str, np.ndarray]
    meta: dict[str, Any]
    image: ExportImage | None = None  # version 2: pixels, boxes and the patch geometry
    spatial: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # path: [B, h, w]
    channel: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # path: [B, C]
    format_version: int = FORMAT_VERSION  # the file's version (1 or 2)

    @property
    def layers(self) -> Mapping[str, np.ndarray]:
        return _Layers(self)

    @property
    def num_examples(self) -> int:
        return int(self.query_tokens.shape[0])

    def is_topk(self, path: str) -> bool:
        return path in self.topk_values

    def num_keys(self, path: str) -> int:
        return int(self.tokens(path)[1].shape[1])

    def tokens(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``(query tokens [B, T], key tokens [B, S])`` of a layer."""
        kind = self.kinds[path]
        q = self.key_tokens if kind == "encoder" else self.query_tokens
        k = self.query_tokens if kind == "self" else self.key_tokens
        return q, k

    def lengths(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``(query lengths [B], key lengths [B])`` of a layer."""
        kind = self.kinds[path]
        q = self.key_lengths if kind == "encoder" else self.query_lengths
        k = self.query_lengths if kind == "self" else self.key_lengths
        return q, k


def _bad(path, why: str) -> ExportFormatError:
    return ExportFormatError(f"{os.fspath(path)} is not a valid flaxattn attention export: {why}")


def load_attention(path: str | os.PathLike) -> AttentionExport:
    """Read and validate an export written by :func:`save_attention`."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ExportFormatError(
            f"{os.fspath(path)} is not a flaxattn attention export (not an .npz archive)"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ExportFormatError(f"{os.fspath(path)} is a .npy array, not a flaxattn export")
    with npz:
        try:
            data = {k: npz[k] for k in npz.files}
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise _bad(path, f"unreadable entry ({err})") from None
    if "format" not in data or str(data["format"]) != FORMAT:
        raise ExportFormatError(
            f"{os.fspath(path)} is not a flaxattn attention export (no 'format' entry "
            f"{FORMAT!r}; entries: {sorted(data)[:8]})"
        )
    version = int(data.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise _bad(path, f"format_version {version}, this flaxattn reads {READABLE_VERSIONS}")
    for key in ("layer_paths", "query_tokens", "query_lengths", "meta"):
        if key not in data:
            raise _bad(path, f"missing entry {key!r}")
    try:
        meta = json.loads(str(data["meta"]))
    except json.JSONDecodeError as err:
        raise _bad(path, f"meta is not JSON ({err})") from None
    q_tok, q_len = data["query_tokens"], data["query_lengths"]
    k_tok, k_len = data.get("key_tokens"), data.get("key_lengths")
    if q_tok.ndim != 2 or q_len.shape != (q_tok.shape[0],):
        raise _bad(path, f"query_tokens {q_tok.shape} / query_lengths {q_len.shape}")
    B = q_tok.shape[0]
    if (k_tok is None) != (k_len is None) or (
        k_tok is not None and (k_tok.ndim != 2 or k_tok.shape[0] != B or k_len.shape != (B,))
    ):
        raise _bad(path, "key_tokens and key_lengths must both be present, [B, S] and [B]")
    paths = tuple(str(p) for p in data["layer_paths"].reshape(-1))
    kinds, dense, tv, ti, heads = {}, {}, {}, {}, {}
    for p in paths:
        kind = str(data.get(f"kind/{p}", ""))
        if kind not in KINDS or (kind != "self" and k_tok is None):
            raise _bad(path, f"layer {p!r} has kind {kind!r}")
        kinds[p] = kind
        T = (k_tok if kind == "encoder" else q_tok).shape[1]
        S = (q_tok if kind == "self" else k_tok).shape[1]
        if f"layer/{p}" in data:
            w = data[f"layer/{p}"]
            if w.ndim != 4 or w.shape[0] != B or w.shape[2:] != (T, S):
                raise _bad(path, f"layer {p!r} has shape {w.shape}, expected [{B}, N, {T}, {S}]")
            dense[p] = w
        elif f"topk_values/{p}" in data and f"topk_indices/{p}" in data:
            v, i = data[f"topk_values/{p}"], data[f"topk_indices/{p}"]
            if v.shape != i.shape or v.ndim != 4 or v.shape[0] != B or v.shape[2] != T:
                raise _bad(path, f"top-k arrays of layer {p!r} have shapes {v.shape}, {i.shape}")
            if i.size and (i.min() < 0 or i.max() >= S):
                raise _bad(path, f"top-k indices of layer {p!r} out of range [0, {S})")
            tv[p], ti[p] = v, i
        else:
            raise _bad(path, f"no weights for layer {p!r}")
        n = (dense[p] if p in dense else tv[p]).shape[1]
        heads[p] = data.get(f"heads/{p}", np.arange(n))
        if heads[p].shape != (n,):
            raise _bad(path, f"heads/{p} has shape {heads[p].shape}, the layer {n} heads")
    extras = {k[len("extra/") :]: v for k, v in data.items() if k.startswith("extra/")}
    image, spatial, channel = None, {}, {}
    if version >= 2:
        image, spatial, channel = _load_images(path, data, B, kinds, q_tok, k_tok)
    if not paths and not spatial and not channel:
        raise _bad(path, "no attention layers and no spatial or channel maps")
    return AttentionExport(
        paths=paths,
        kinds=kinds,
        dense=dense,
        topk_values=tv,
        topk_indices=ti,
        heads=heads,
        query_tokens=q_tok,
        key_tokens=k_tok,
        query_lengths=q_len,
        key_lengths=k_len,
        extras=extras,
        meta=meta,
        image=image,
        spatial=spatial,
        channel=channel,
        format_version=version,
    )


def _load_images(path, data, B, kinds, q_tok, k_tok):
    """The version-2 entries of ``data``, validated as :func:`save_attention` does."""
    spatial, channel = {}, {}
    for prefix, maps, ndim in (("spatial/", spatial, 3), ("channel/", channel, 2)):
        for key, value in data.items():
            if key.startswith(prefix):
                if value.ndim != ndim or value.shape[0] != B:
                    raise _bad(path, f"{key} has shape {value.shape}, expected {ndim} axes, B={B}")
                maps[key[len(prefix) :]] = value
    fields = {
        "pixels": data.get("image/pixels"),
        "box": data.get("image/box"),
        "grid": data.get("image/grid"),
        "patch": data.get("image/patch"),
        "prefix": data.get("image/prefix", np.array(0)),
    }
    if fields["pixels"] is None:
        stray = [k for k in data if k.startswith("image/")]
        if stray:
            raise _bad(path, f"image entries {stray} without image/pixels")
        return None, spatial, channel
    try:
        image = _check_image(fields, B)
    except (ValueError, TypeError) as err:
        raise _bad(path, str(err)) from None
    if image.grid is not None:
        for p, kind in kinds.items():
            length = (q_tok if kind == "self" else k_tok).shape[1]
            if kind != "cross" and image.prefix + image.num_patches > length:
                raise _bad(
                    path,
                    f"layer {p!r} has {length} tokens, fewer than the image's "
                    f"prefix + patches {image.prefix + image.num_patches}",
                )
    return image, spatial, channel
