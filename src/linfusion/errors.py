"""The one base class of the errors that are the user's to fix.

A :class:`UserError` means the request cannot work as given (a number out of range, a file that is not an
image, a folder that would be clobbered, a budget too small) and its message says what to change. The
command line prints such an error as one paragraph and exits with status 2, without a traceback; any other
exception is a bug and keeps its traceback. Each layer defines its own subclasses (``GenerationError``,
``DataError``, ``LinFusionCheckpointError``, ...), usually also deriving from the built-in class that
describes them (``ValueError``, ``MemoryError``), so existing ``except ValueError`` code keeps working.

This module imports nothing, so every layer may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """The request cannot work as given; the message says what to change (shown without a traceback)."""


EXCERPT_CHARACTERS = 120  # the most of a user's text an error message quotes


def excerpt(value: object, limit: int = EXCERPT_CHARACTERS) -> str:
    """``value`` quoted for a one-paragraph error (``repr``): its first ``limit`` characters and how many more.

    A message quoting what the user gave (a PNG's parameters text, a prompt) stays one readable line even
    when that text is a megabyte.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value) - limit:,} more characters)"
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown) - limit:,} more characters)"


__all__ = ["EXCERPT_CHARACTERS", "UserError", "excerpt"]
