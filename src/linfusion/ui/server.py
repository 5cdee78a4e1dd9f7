"""The ``linfusion ui`` server: checks, models loaded, the page served until Ctrl-C or SIGTERM.

The command's arguments are parsed in :mod:`linfusion.cli.ui`; the page is :mod:`linfusion.ui.page`. A
refusal (a bad port, no Gradio, an outputs folder that cannot be written, a port in use, a model that
cannot load) is a :class:`~linfusion.errors.UserError`, which the command line prints with exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServerError(UserError):
    """The server cannot start as asked; the message says what to change."""


def _quiet_environment() -> None:
    """No usage data, no telemetry: set before Gradio and the Hub client are imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("DISABLE_TELEMETRY", "1")


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(
    *,
    models: Sequence[str],
    host: str,
    port: int,
    outputs: str | os.PathLike,
    device: str,
    threads: int | None,
    max_upload_mb: float,
) -> int:
    """Load ``models``, serve the page on ``host``:``port`` until stopped; returns the exit code (0).

    The arguments are those of ``linfusion ui`` (:mod:`linfusion.cli.ui` holds their defaults).
    """
    if not 0 < port < 65536:
        raise ServerError(f"--port {port} is not a port number")
    if host not in LOOPBACK_HOSTS:
        print(
            f"linfusion ui: warning: listening on {host}, not on this machine only: anyone who can reach "
            f"port {port} can use the page, the models and the images in the outputs folder (there is "
            "no login).",
            file=sys.stderr,
        )
    _quiet_environment()
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ServerError("the page needs Gradio: pip install 'linfusion[ui]'") from error
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .backend import Backend
    from .jobs import JobRunner
    from .page import CSS, HEAD, build_page, theme

    folder = Path(outputs).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServerError(f"cannot create the outputs folder {folder}: {error.strerror}") from error
    if not os.access(folder, os.W_OK):
        raise ServerError(f"the outputs folder {folder} is not writable")
    backend = Backend(models, folder, device=device)
    backend.load_all()
    runner = JobRunner()
    page = build_page(backend, runner)
    page.queue(default_concurrency_limit=None)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            quiet=True,
            show_error=False,
            max_file_size=int(max_upload_mb * 2**20),
            allowed_paths=[str(folder)],
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            run_history=False,
            footer_links=[],
            prevent_thread_lock=True,
            theme=theme(),
            css=CSS,
            head=HEAD,
        )
    except OSError as error:
        runner.close()
        raise ServerError(f"cannot listen on {host}:{port}: {error}") from error
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"linfusion ui: http://{shown_host}:{port}/ (models: {', '.join(models)}; device: "
        f"{backend.device}; outputs: {folder})",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _stop)  # the server's threads keep a plain SIGTERM from ending it
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        runner.close()
        page.close()
    return 0
