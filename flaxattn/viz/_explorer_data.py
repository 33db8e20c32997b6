"""Compact embedding of attention weights in the explorer page: linear quantisation, deflate,
base64.

A float array ``w`` is stored as integer codes ``c = round((w - lo) / step)`` with
``step = (hi - lo) / (2**bits - 1)``, where ``[lo, hi] = [min(0, min w), max(1, max w)]``: for
attention weights (which lie in ``[0, 1]``) ``lo = 0``, ``hi = 1``, so 0 and 1 are exact and
``step`` is ``1/255`` (8 bits) or ``1/65535`` (16 bits). The page decodes ``lo + c * (hi - lo)
/ (2**bits - 1)`` in float64, so every decoded weight is within ``step / 2`` of the stored one:
``1/510 ~ 0.00196`` with 8 bits, ``1/131070 ~ 7.6e-6`` with 16 bits.

The codes (little-endian ``uint8`` / ``uint16``) are compressed with deflate (the zlib format,
which browsers inflate with the standard ``DecompressionStream("deflate")``) and written as
base64 text. Softmax rows sum to 1, so with 8 bits a row of ``S`` keys has codes summing to
about 255: over long rows most codes are 0 or 1, and deflate stores them in about 2 bits each
(6 layers x 8 heads x 256 x 256 x 8 examples of diffuse weights: about 5 MB of deflate, 7 MB of
base64). Masked cells hold 0 and cost almost nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib

import numpy as np

__all__ = [
    "AUTO_16_BITS_MAX_CELLS",
    "BITS",
    "Quantised",
    "choose_bits",
    "decode_codes",
    "encode_codes",
    "quantise",
]

BITS = (8, 16)
# Exports with at most this many stored weights get 16-bit codes (under about 8 MB of page in
# the worst case); larger ones 8-bit codes, which keeps 25M weights under 10 MB.
AUTO_16_BITS_MAX_CELLS = 2**21
_DEFLATE_LEVEL = 6  # level 9 is 10x slower for 8% less


@dataclasses.dataclass(frozen=True)
class Quantised:
    """Integer codes of a float array and the linear map back: ``lo + codes * step``."""

    codes: np.ndarray  # uint8 or uint16, the shape of the input
    lo: float  # the value of code 0
    hi: float  # the value of the largest code, 2**bits - 1
    bits: int  # 8 or 16

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        return (self.hi - self.lo) / self.levels

    @property
    def max_error(self) -> float:
        """The largest distance between a decoded and an original value: half a step."""
        return self.step / 2

    def decode(self) -> np.ndarray:
        """The decoded values in float64, computed as the page computes them."""
        return self.lo + self.codes.astype(np.float64) * (self.hi - self.lo) / self.levels


def choose_bits(bits: int | None, cells: int) -> int:
    """``bits`` checked, or for None the automatic choice for ``cells`` stored weights."""
    if bits is None:
        return 16 if cells <= AUTO_16_BITS_MAX_CELLS else 8
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8, 16 or None (automatic), got {bits!r}")
    return int(bits)


def quantise(values, bits: int, *, name: str = "values") -> Quantised:
    """Linear ``bits``-bit codes of ``values`` on ``[min(0, min), max(1, max)]``.

    Raises ValueError (naming ``name``) when a value is NaN or infinite.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    w = np.asarray(values, dtype=np.float64)
    if w.size and not np.isfinite(w).all():
        raise ValueError(f"{name} holds NaN or infinite weights; the explorer cannot show them")
    lo = min(0.0, float(w.min(initial=0.0)))
    hi = max(1.0, float(w.max(initial=1.0)))
    levels = 2**bits - 1
    codes = np.rint((w - lo) * (levels / (hi - lo)))
    codes = np.clip(codes, 0, levels).astype(np.uint8 if bits == 8 else np.uint16)
    return Quantised(codes=codes, lo=lo, hi=hi, bits=bits)


def encode_codes(codes: np.ndarray) -> str:
    """Unsigned integer codes (any shape, C order) as base64 of deflated little-endian bytes."""
    codes = np.asarray(codes)
    if codes.dtype.kind != "u":
        raise TypeError(f"codes must be unsigned integers, got {codes.dtype}")
    raw = np.ascontiguousarray(codes, dtype=codes.dtype.newbyteorder("<")).tobytes()
    return base64.b64encode(zlib.compress(raw, _DEFLATE_LEVEL)).decode("ascii")


def decode_codes(text: str, dtype, shape) -> np.ndarray:
    """The inverse of :func:`encode_codes` (what the page does with DecompressionStream)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    raw = zlib.decompress(base64.b64decode(text))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
