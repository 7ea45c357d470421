"""Servers a test starts on 127.0.0.1: a free port, waiting for the first answer, stopping the process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(server: subprocess.Popen, url: str, seconds: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or stays silent for ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}"
            time.sleep(2)


def stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the process group started with ``start_new_session=True`` (uvicorn and its workers), then SIGKILL."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
