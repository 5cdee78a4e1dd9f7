"""The ``linfusion ui`` server: checks, models loaded, the page served until Ctrl-C or SIGTERM.

The command's arguments are parsed in :mod:`linfusion.cli.ui`; the page is :mod:`linfusion.ui.page`. A
refusal (a bad port, no Gradio, an outputs folder that cannot be written, a port in use, a model that
cannot load) is a :class:`~linfusion.errors.UserError`, which the command line prints with exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import probe_writable

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
    if threads is not None and threads < 1:
        raise ServerError(f"--threads {threads}: pass a number of CPU threads >= 1 (or leave it out)")
    if not max_upload_mb > 0 or max_upload_mb == float("inf"):
        raise ServerError(f"--max-upload-mb {max_upload_mb}: pass a size in MB > 0, such as 50")
    _quiet_environment()
    folder = outputs_folder(outputs)
    with gradio_temporary_folder(folder):
        return _serve(models, host, port, folder, device, threads, max_upload_mb)


def outputs_folder(outputs: str | os.PathLike) -> Path:
    """The outputs folder, created when missing; :class:`ServerError` when it cannot be written."""
    folder = Path(outputs).resolve()
    if folder.exists() and not folder.is_dir():
        raise ServerError(f"--outputs {folder} is a file, not a folder; name a folder for the images")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServerError(f"cannot create the outputs folder {folder}: {error.strerror}") from error
    try:
        probe_writable(folder)
    except OSError as error:
        raise ServerError(f"the outputs folder {folder} is not writable ({error.strerror})") from error
    return folder


@contextlib.contextmanager
def gradio_temporary_folder(folder: Path) -> Iterator[Path]:
    """Gradio's uploads and cached results in a hidden folder of ``folder``, removed when the server stops.

    Gradio keeps them in the system's temporary folder unless ``GRADIO_TEMP_DIR`` names another, read when
    Gradio is imported and when the page is built, so it is set before both.
    """
    temporary = Path(tempfile.mkdtemp(prefix=".gradio-", dir=folder))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(temporary)
    try:
        yield temporary
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(temporary, ignore_errors=True)


def _serve(
    models: Sequence[str],
    host: str,
    port: int,
    folder: Path,
    device: str,
    threads: int | None,
    max_upload_mb: float,
) -> int:
    """Load the models and serve the page until stopped (the checked arguments of :func:`serve`)."""
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ServerError("the page needs Gradio: pip install 'linfusion[ui]'") from error
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .assets import CSS, HEAD, theme
    from .backend import Backend
    from .jobs import JobRunner
    from .page import build_page

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
