"""Start a real ``hydraserve serve`` subprocess on loopback and wait until it is healthy.

Used by the end-to-end tests, the benchmarks and ``hydraserve bench``::

    with ServerProcess(["model=echo", "cache=none"]) as server:
        httpx.post(server.url + "/predict", json={"input": "hi"})
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Health polls would otherwise log one INFO line each through httpx.
logging.getLogger("httpx").setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerFailedToStart(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, overrides: list[str], port: int | None = None, env: dict | None = None,
                 startup_timeout: float = 300, output_dir: str | None = None, code_root: str | None = None,
                 wrapper: list[str] | None = None):
        """``code_root``: the checkout whose ``framework`` the server runs (default: this one; a git
        worktree of another commit gives an A/B of two versions). ``wrapper``: a command the server
        runs under (``["valgrind", ...]``)."""
        self.code_root = code_root or str(Path(__file__).resolve().parent.parent)
        self.wrapper = list(wrapper or [])
        self.port = port or free_port()
        self.overrides = list(overrides)
        self.env = env
        self.startup_timeout = startup_timeout
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="hydraserve-run-")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self.output_dir) / "server.log"

    def command(self) -> list[str]:
        extra = [] if any(o.startswith("hydra.run.dir=") for o in self.overrides) else \
            [f"hydra.run.dir={self.output_dir}"]
        return [*self.wrapper, sys.executable, "-m", "framework.cli", "serve", *self.overrides, *extra,
                f"server.port={self.port}"]

    def start(self) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["PYTHONPATH"] = self.code_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # A new session, so stop() can end the API processes and workers it forked/spawned too.
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.output_dir)
        self.wait_healthy()
        return self

    def log_tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerFailedToStart(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return
                time.sleep(0.1)
        self.stop()
        raise ServerFailedToStart(f"server not healthy after {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the process group (workers, API processes) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
