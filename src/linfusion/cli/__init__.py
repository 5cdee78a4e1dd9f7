"""The ``linfusion`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
These modules hold argparse only: the application is imported inside those callables, so that
``linfusion --help`` and every ``linfusion COMMAND --help`` import neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
