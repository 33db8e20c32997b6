"""Attention exports: the ``.npz`` file format, an atomic writer and a validating loader.

An export holds the attention weights of every layer and head of a model for a batch of ``B``
examples, with the token strings and valid lengths needed to read them. It is a plain ``.npz``
(no pickles: ``np.load(path, allow_pickle=False)`` reads it). Entries:

========================  =============  =====================================================
entry                     shape / dtype  meaning
========================  =============  =====================================================
``format``                str            ``"flaxattn.attention"``, marks a flaxattn export
``format_version``        int            ``1``
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
========================  =============  =====================================================

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
``os.replace``) and :func:`load_attention` to read back an :class:`AttentionExport`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxattn.analysis import topk_compress, topk_decompress

__all__ = ["AttentionExport", "ExportFormatError", "KINDS", "load_attention", "save_attention"]

FORMAT = "flaxattn.attention"
FORMAT_VERSION = 1
KINDS = ("self", "cross", "encoder")


class ExportFormatError(ValueError):
    """The file is not a (valid) flaxattn attention export."""


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
    query_tokens,
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
    """
    path = Path(path)
    if not layers:
        raise ValueError("layers is empty: nothing to export")
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

    for name, value in (extras or {}).items():
        v = np.asarray(value)
        if v.dtype == object:
            raise ValueError(f"extras[{name!r}] must be a numeric, bool or str array")
        arrays[f"extra/{name}"] = v
    info = dict(meta or {})
    for key in ("task", "config", "step"):
        info.setdefault(key, None)
    info.setdefault("flaxattn_version", _version())
    info.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    info["bounded"] = {
        "top_k": None if top_k is None else int(top_k),
        "layer_filter": layer_filter if isinstance(layer_filter, (str, type(None))) else paths,
        "heads": None if heads is None else np.atleast_1d(heads).tolist(),
    }
    arrays["meta"] = np.array(json.dumps(info, default=_json_default, sort_keys=True))
    _atomic_savez(path, arrays, compress)
    return path


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
    """A loaded export. ``layers[path]`` gives dense ``[B, N, T, S]`` float32 weights."""

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
    if version != FORMAT_VERSION:
        raise _bad(path, f"format_version {version}, this flaxattn reads {FORMAT_VERSION}")
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
    )
