"""The ``linfusion`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
These modules hold argparse only: the application is imported inside those callables, so that
``linfusion --help`` and every ``linfusion COMMAND --help`` import neither torch nor diffusers.

:func:`main` is the one place that decides how a command ends: a :class:`~linfusion.errors.UserError`
(bad numbers, unreadable images, folders that would be clobbered, budgets that cannot fit) is printed as
one paragraph with exit status 2 (:data:`USER_ERROR`); any other exception is a bug: one "internal error"
line and exit status 1 (:data:`INTERNAL_ERROR`), its traceback with ``-v``, which shows everything. It also sets the process up as :mod:`linfusion.runtime`
describes (glibc keeps freed memory; third-party notices silenced unless ``-v``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import traceback

from ..errors import UserError
from ..runtime import keep_freed_memory, quiet_third_party_notices

USER_ERROR = 2  # the request cannot work as given (argparse uses 2 for bad arguments too)
INTERNAL_ERROR = 1  # a bug: anything that is not a UserError

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
        with contextlib.nullcontext() if verbose else quiet_third_party_notices():
            return int(args.func(args) or 0)
    except UserError as error:
        if verbose:
            traceback.print_exc()
        print(f"linfusion {command}: {error}", file=sys.stderr)
        return USER_ERROR
    except Exception as error:  # a bug: say so in one line, the traceback with -v
        if verbose:
            traceback.print_exc()
        print(
            f"linfusion {command}: internal error: {type(error).__name__}: {error} "
            + ("(please report it with the traceback above)" if verbose else
               "(run with -v for the traceback; please report it)"),
            file=sys.stderr,
        )  # fmt: skip
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
