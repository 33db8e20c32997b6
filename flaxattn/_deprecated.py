"""Names that moved in 0.2: each still resolves for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


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
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed in flaxattn 0.3; use "
            f"{home}.{new} (see CHANGELOG.md).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), new)

    return getattr_
