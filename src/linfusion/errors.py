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


__all__ = ["UserError"]
