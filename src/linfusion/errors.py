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


def excerpt(text: str, limit: int = EXCERPT_CHARACTERS) -> str:
    """``text`` quoted for a one-paragraph error: its first ``limit`` characters and how many more there are.

    A message quoting what the user gave (a PNG's parameters text, a prompt) stays one readable line even
    when that text is a megabyte.
    """
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit:,} more characters)"


__all__ = ["EXCERPT_CHARACTERS", "UserError", "excerpt"]
