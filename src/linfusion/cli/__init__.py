"""The ``linfusion`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
These modules hold argparse only: the application is imported inside those callables, so that
``linfusion --help`` and every ``linfusion COMMAND --help`` import neither torch nor diffusers.

:func:`main` is the one place that decides how a command ends: a :class:`~linfusion.errors.UserError`
(bad numbers, unreadable images, folders that would be clobbered, budgets that cannot fit) is printed as
one paragraph with exit status 2 (:data:`USER_ERROR`), and so is an output that did not fit on its disk
(``ENOSPC`` or ``EDQUOT``: the file, the space left there, what to do); any other exception is a bug:
one "internal error" line and exit status 1 (:data:`INTERNAL_ERROR`), its traceback with ``-v``, which
shows everything. Ctrl-C is one line and status 130 (:data:`INTERRUPTED`); a standard output whose reader
went away (``| head``) ends quietly with 141 (:data:`BROKEN_PIPE`), one that cannot be written
(``> /dev/full``) with one line and status 1. It also sets the process up as :mod:`linfusion.runtime` describes (glibc keeps freed memory;
third-party notices silenced unless ``-v``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

from ..errors import UserError
from ..io import disk_full_message, is_disk_full
from ..runtime import keep_freed_memory, quiet_third_party_notices

USER_ERROR = 2  # the request cannot work as given (argparse uses 2 for bad arguments too)
INTERNAL_ERROR = 1  # a bug: anything that is not a UserError
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
BROKEN_PIPE = 141  # the reader of stdout went away: 128 + SIGPIPE, as shells report it

# Modules providing sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "linfusion.cli.generate",
    "linfusion.cli.plan",
    "linfusion.cli.distill",
    "linfusion.cli.bench",
    "linfusion.cli.ui",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="linfusion",
        description="LinFusion: linear-attention Stable Diffusion for very large images.",
    )
    parser.add_argument("--version", action="version", version=f"linfusion {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user's mistake, 1 for a bug; the message on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    keep_freed_memory()  # before torch allocates anything
    verbose = bool(getattr(args, "verbose", False))
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = " ".join(filter(None, (args.command, getattr(args, "bench_command", None))))
    try:
        with contextlib.nullcontext() if verbose else quiet_third_party_notices(), guarded_stdout():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"linfusion {command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except StdoutError as error:
        stdout_gone()
        if error.errno == errno.EPIPE:  # `linfusion ... | head`: the reader has all it wanted
            return BROKEN_PIPE
        print(f"linfusion {command}: cannot write to standard output: {error.strerror}", file=sys.stderr)
        return INTERNAL_ERROR
    except UserError as error:
        return report_user_error(command, str(error), verbose)
    except OSError as error:
        if is_disk_full(error):  # an output that did not fit on its disk: the user's to fix, not a bug
            return report_user_error(command, disk_full_message(error), verbose)
        return report_bug(command, error, verbose)
    except Exception as error:  # a bug: say so in one line, the traceback with -v
        return report_bug(command, error, verbose)


def report_user_error(command: str, message: str, verbose: bool) -> int:
    """The user's mistake as one paragraph on stderr (the traceback first with ``-v``); its exit status."""
    if verbose:
        traceback.print_exc()
    print(f"linfusion {command}: {message}", file=sys.stderr)
    return USER_ERROR


def report_bug(command: str, error: BaseException, verbose: bool) -> int:
    """One "internal error" line on stderr (the traceback first with ``-v``); the bug's exit status."""
    if verbose:
        traceback.print_exc()
    print(
        f"linfusion {command}: internal error: {type(error).__name__}: {error} "
        + ("(please report it with the traceback above)" if verbose else
           "(run with -v for the traceback; please report it)"),
        file=sys.stderr,
    )  # fmt: skip
    return INTERNAL_ERROR


class StdoutError(OSError):
    """Standard output could not be written (a closed pipe, a full disk or ``/dev/full`` behind ``>``)."""


class _GuardedStream:
    """``sys.stdout`` whose failed writes raise :class:`StdoutError`, so they are told apart from the others."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise StdoutError(error.errno, error.strerror) from error

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise StdoutError(error.errno, error.strerror) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """Run the command with :class:`_GuardedStream` as stdout, flushed at the end (where a full one fails)."""
    original = sys.stdout
    sys.stdout = _GuardedStream(original)  # type: ignore[assignment]
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = original


def stdout_gone() -> None:
    """Point stdout at devnull so that Python's exit flush cannot fail again (the Python docs' SIGPIPE recipe)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
