"""The one protocol for every in-place change linfusion makes to a user's model.

Applying a patch returns a :class:`Patch` handle. ``handle.remove()`` restores exactly what that one
application changed and nothing else; handles are context managers (``with apply(...): ...``); several
applications nest and are undone in reverse order. A handle that finds its change overwritten by a later
application refuses to undo it (:class:`PatchOrderError`) instead of silently dropping the later one.

The primitives here record the state they replace (an instance attribute, present or absent; a submodule;
a hook), so every concrete patch (LinFusion mounting, memory savers, exact tiling, the linear VAE
attention, DemoFusion's dilation) is built from them and inherits exact undo. This module imports nothing
from the rest of the package, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

_ABSENT = object()


class PatchOrderError(RuntimeError):
    """A patch was removed while a later patch of the same place was still applied."""


class Patch:
    """A handle on one application of a patch: ``remove()`` undoes it exactly, once.

    ``undo`` callables run in reverse order of registration; removing twice is harmless.
    """

    def __init__(self, name: str, undo: Iterable[Callable[[], None]] = ()) -> None:
        self.name = name
        self._undo: list[Callable[[], None]] = list(undo)
        self._active = True

    @property
    def active(self) -> bool:
        """True until :meth:`remove` ran."""
        return self._active

    @property
    def changed(self) -> bool:
        """Whether this application changed anything (a repeated application may change nothing)."""
        return bool(self._undo)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register one more step of the undo; it runs before the ones registered earlier."""
        if not self._active:
            raise RuntimeError(f"{self.name}: cannot extend a patch that was removed")
        self._undo.append(undo)

    def add(self, patch: Patch) -> Patch:
        """Make ``patch`` part of this one (removed with it, in reverse order); returns ``patch``."""
        self.on_remove(patch.remove)
        return patch

    def remove(self) -> None:
        """Undo this application; later patches on the same places must have been removed first."""
        if not self._active:
            return
        while self._undo:
            self._undo[-1]()
            self._undo.pop()
        self._active = False

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<Patch {self.name} ({state}, {len(self._undo)} changes)>"


def set_attribute(obj: Any, name: str, value: Any, patch_name: str | None = None) -> Patch:
    """Set the *instance* attribute ``obj.name`` (bypassing ``nn.Module.__setattr__``).

    ``remove()`` puts back the previous instance attribute, or deletes it when there was none (a method
    or class attribute then shows through again). It raises :class:`PatchOrderError` if the attribute
    was set to something else in the meantime.
    """
    previous = obj.__dict__.get(name, _ABSENT)
    object.__setattr__(obj, name, value)

    def undo() -> None:
        if obj.__dict__.get(name, _ABSENT) is not value:
            raise PatchOrderError(
                f"{type(obj).__name__}.{name} was changed again after this patch; "
                "remove the later patch first (patches undo in reverse order)"
            )
        if previous is _ABSENT:
            del obj.__dict__[name]
        else:
            object.__setattr__(obj, name, previous)

    return Patch(patch_name or f"{type(obj).__name__}.{name}", [undo])


def replace_submodule(
    root: Any, path: str, module: Any, on_restore: Callable[[Any], None] | None = None
) -> Patch:
    """Put ``module`` at ``root``'s submodule ``path``; ``remove()`` puts the previous one back.

    ``on_restore(previous)`` runs just before the previous module returns (e.g. to move it to the
    device and dtype the model has meanwhile).
    """
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    previous = getattr(parent, child)
    setattr(parent, child, module)

    def undo() -> None:
        if getattr(parent, child) is not module:
            raise PatchOrderError(
                f"module {path!r} was replaced again after this patch; remove the later patch first"
            )
        if on_restore is not None:
            on_restore(previous)
        setattr(parent, child, previous)

    return Patch(f"replace {path}", [undo])


def hooks(name: str, handles: Iterable[Any]) -> Patch:
    """A patch made of ``torch.utils.hooks.RemovableHandle`` objects (forward hooks, pre-hooks)."""
    return Patch(name, [handle.remove for handle in handles])


__all__ = ["Patch", "PatchOrderError", "hooks", "replace_submodule", "set_attribute"]
