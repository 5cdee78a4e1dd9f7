"""Plumbing of the browser tests: the real ``linfusion ui`` in a child process, Chromium, a recording proxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import linfusion

LOOPBACK_NAMES = "127.0.0.1,localhost,::1"
START_SECONDS = 180  # loading the model and Gradio on a busy 2-core machine


def find_chromium() -> str:
    """Debian's Chromium (``apt-get install -y chromium``, which ``make test`` does), or $LINFUSION_CHROMIUM.

    A missing Chromium fails the test that needs it; it never skips it.
    """
    candidates = [
        os.environ.get("LINFUSION_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "the browser tests need Chromium: apt-get install -y chromium (make test installs it when run as root), "
        "or set LINFUSION_CHROMIUM to a Chromium binary"
    )


class ConnectionRecorder:
    """A loopback 'proxy' that accepts connections, records their first line and closes them."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    self.attempts.append(connection.recv(512).split(b"\r\n")[0].decode(errors="replace"))

    def close(self) -> None:
        self._socket.close()


@dataclass
class UiServer:
    """A running ``linfusion ui``: its address, its outputs folder, and what it printed."""

    url: str
    outputs: Path
    log: list[str] = field(default_factory=list)

    def pngs(self) -> list[Path]:
        return sorted(self.outputs.glob("*.png"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_ui(
    outputs: Path, gradio_temp: Path, proxy: str, options: Sequence[str] = ()
) -> Iterator[UiServer]:
    """``python -m linfusion ui`` of this checkout on a free loopback port, with every proxy variable set to
    ``proxy`` (so any connection it tries elsewhere is recorded); stopped with SIGTERM, which must end it."""
    port = free_port()
    source = str(Path(linfusion.__file__).resolve().parents[1])  # this checkout, also in the child
    proxies = dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"), proxy)
    env = {
        **os.environ,
        **proxies,
        "NO_PROXY": LOOPBACK_NAMES,
        "no_proxy": LOOPBACK_NAMES,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(gradio_temp),
        "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [sys.executable, "-m", "linfusion", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--outputs", str(outputs), *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = UiServer(f"http://127.0.0.1:{port}/", outputs)
    ready = threading.Event()

    def read_log() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.log.append(line.rstrip())
            if line.startswith(f"linfusion ui: http://127.0.0.1:{port}/"):
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + START_SECONDS
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("linfusion ui did not start:\n" + "\n".join(server.log[-40:]))
    try:
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("linfusion ui did not stop on SIGTERM:\n" + "\n".join(server.log[-20:]))
