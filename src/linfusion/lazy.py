"""Lazily resolved package attributes: a package lists its public names and the submodule of each.

Importing a package (``linfusion``, ``linfusion.app``, ...) then costs nothing; the submodule, and torch
behind it, is imported on first use of a name. This is what keeps ``linfusion --help`` instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package`` whose names live in ``exports``' submodules.

    ``exports`` maps each public name to its submodule, relative to ``package`` (e.g. ``"app.run"``).
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
