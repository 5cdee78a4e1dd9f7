"""``linfusion ui``: argument parsing only; the server is :mod:`linfusion.ui.server` (needs the ``ui`` extra)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 50


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="a local web page to generate and enlarge images (pip install 'linfusion[ui]')",
        description="Serve the LinFusion web page on this machine: text to image up to 16K, upscaling, the "
        "memory plan before each run. Listens on 127.0.0.1 only unless --host says otherwise; the page "
        "fetches nothing from the internet and sends no usage data.",
    )
    parser.add_argument(
        "--model",
        action="extend",
        nargs="+",
        default=None,
        metavar="ID_OR_PATH",
        help="models the page offers (pipeline folders, Hub ids, bundled or bundled-dit); loaded once at start. "
        "Default: bundled",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--outputs", default="outputs", help="folder for the images (default ./outputs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload the page accepts"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ui.server import serve

    return serve(
        models=args.model or ["bundled"],
        host=args.host,
        port=args.port,
        outputs=args.outputs,
        device=args.device,
        threads=args.threads,
        max_upload_mb=args.max_upload_mb,
    )
