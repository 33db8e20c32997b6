"""Names that moved in 0.2: each still resolves for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """The one wording of a deprecation: `old` goes in 0.3, use `new` instead.

    Args:
      old: the deprecated spelling, as the caller wrote it (e.g. `flaxattn.attention`).
      new: what to use instead.
      stacklevel: as for `warnings.warn`, counted from the caller of this function.
    """
    warnings.warn(
        f"{old} is deprecated and will be removed in flaxattn 0.3; use {new} (see CHANGELOG.md).",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def module_getattr(module: str, moved: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that resolves each old name to its new home.

    Args:
      module: the module's `__name__`, for messages.
      moved: `{old name: (new module, new name)}`.

    Returns:
      The `__getattr__` function; it raises `AttributeError` for any other name.
    """

    def getattr_(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, new = moved[name]
        warn_deprecated(f"{module}.{name}", f"{home}.{new}", stacklevel=2)
        return getattr(importlib.import_module(home), new)

    return getattr_
