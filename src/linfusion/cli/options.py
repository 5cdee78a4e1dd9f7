"""Options every command shares: how much it says (``--quiet``, ``-v`` / ``--verbose``), image sizes and
memory budgets, parsed here once (argparse ``type=``) so that the application takes integers."""

from __future__ import annotations

import argparse


def add_verbosity_options(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    """``-v`` / ``--verbose`` (and, with ``quiet``, ``--quiet``); they exclude each other."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything: third-party notices, info logs, and the traceback of any error",
    )
    if quiet:
        group.add_argument(
            "--quiet", action="store_true", help="print only the output path (no progress, plan or notes)"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (width, height); whether the numbers work is checked by the application."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768; got {text!r}") from error
    return width, height


def parse_budget(text: str) -> int:
    """``24GB``, ``1.5GiB``, ``512MB`` or bytes -> bytes (:func:`linfusion.io.parse_size`)."""
    from ..io import parse_size as parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


__all__ = ["add_verbosity_options", "parse_budget", "parse_size"]
