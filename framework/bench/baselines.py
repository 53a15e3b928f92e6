"""Baselines measured in the same run as hydraserve, so every report carries ratios.

* ``fastapi_echo``: plain FastAPI + uvicorn answering ``{"output": <input>}`` on loopback. No model,
  no queue: the floor any Python HTTP server stands on.
* ``litserve_raw``: stock ``litserve.LitServer`` serving the *same* model through the model plugin's
  hooks (decode -> preprocess -> forward -> postprocess -> encode), with the quantization applied and
  the same ``max_batch_size``/batch timeout, on LitServe's own transport. What hydraserve adds or
  saves over LitServe as shipped.

Each runs as a subprocess (``python -m framework.bench.baselines NAME --port P --path /predict
--config cfg.json``) on 127.0.0.1; ``BaselineProcess`` starts it, waits for ``/health`` and stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from framework.launch import free_port

BASELINES = ("fastapi_echo", "litserve_raw")
# Batching plugins name their wait differently; the first key found is LitServe's batch_timeout.
_WAIT_KEYS_MS = ("batch_timeout_ms", "max_wait_ms", "max_delay_ms", "timeout_ms", "wait_ms")
_WAIT_KEYS_S = ("batch_timeout_s", "batch_timeout", "max_wait_s")


def batch_settings(batching: dict) -> tuple[int, float]:
    """(max_batch_size, batch_timeout in seconds) for LitServe from a ``batching`` config node."""
    size = int(batching.get("max_batch_size", 1) or 1)
    for key in _WAIT_KEYS_MS:
        if batching.get(key) is not None:
            return size, float(batching[key]) / 1000.0
    for key in _WAIT_KEYS_S:
        if batching.get(key) is not None:
            return size, float(batching[key])
    return size, 0.0


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> None:
    """Poll ``GET /health`` until 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with code {proc.returncode} before it was healthy"
                               + _tail(log_path))
        try:
            with opener.open(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f}s" + _tail(log_path))


def _tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- last lines of " + str(log_path) + " ---\n" + "\n".join(text)


class BaselineProcess:
    """Context manager: a baseline server subprocess on 127.0.0.1; ``url`` once entered."""

    def __init__(self, name: str, config: dict, path: str = "/predict", log_dir: str | Path | None = None,
                 startup_timeout: float = 300.0, port: int | None = None):
        if name not in BASELINES:
            raise ValueError(f"bench.baselines: unknown baseline {name!r}; available: {', '.join(BASELINES)}")
        self.name, self.config, self.path = name, config, path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"baseline_{name}.log"
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> BaselineProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="hydraserve-baseline-")
        cfg_file = Path(self._tmp.name) / "config.json"
        cfg_file.write_text(json.dumps(self.config, default=str))
        cmd = [sys.executable, "-m", "framework.bench.baselines", self.name, "--port", str(self.port),
               "--path", self.path, "--config", str(cfg_file)]
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__ via the process
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                      start_new_session=True)  # Ctrl-C in the terminal stops the bench
        log.close()
        try:
            wait_healthy(self.url, self.startup_timeout, self._proc, self.log_path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None and self._proc.poll() is None:
            import signal

            try:  # the whole session: LitServe's workers and API processes too
                os.killpg(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ------------------------------------------------------------------------------------ the servers
def serve_fastapi_echo(port: int, path: str) -> None:
    import orjson
    import uvicorn
    from fastapi import FastAPI, Request, Response

    app = FastAPI(openapi_url=None)

    @app.get("/health")
    async def health() -> Response:
        return Response(b"ok", media_type="text/plain")

    async def echo(request):
        body = orjson.loads(await request.body())
        data = body.get("input") if isinstance(body, dict) else body
        return Response(orjson.dumps({"output": data}), media_type="application/json")

    # Real classes, not the strings `from __future__ import annotations` makes: FastAPI reads them.
    echo.__annotations__ = {"request": Request, "return": Response}
    app.post(path)(echo)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_litserve_raw(port: int, path: str, config: dict) -> None:
    import litserve as ls

    from framework.bench._litserve_api import RawModelAPI
    from framework.config import validate

    resolved = validate(config)  # fail here, with the full list of problems, not in a worker
    hw = resolved.hardware
    devices = hw.devices()
    size, timeout = batch_settings(config.get("batching") or {})
    server = ls.LitServer(
        RawModelAPI(config, max_batch_size=size, batch_timeout=timeout, api_path=path),
        accelerator=hw.accelerator(),
        devices=devices if isinstance(devices, int) else "auto",
        workers_per_device=hw.workers_per_device(),
        timeout=resolved.server.timeout_ms / 1000.0,
    )
    server.run(host="127.0.0.1", port=port, num_api_servers=resolved.server.num_api_servers,
               generate_client_file=False, log_level="warning")


def _exit_with_parent() -> None:
    """Stop this baseline (and its process group) when the bench that started it is gone.

    The baseline runs in its own session so a terminal Ctrl-C reaches the bench first; this thread
    makes sure a killed bench (SIGKILL, a CI timeout) never leaves a server behind.
    """
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                if os.getpgid(0) == os.getpid():  # our own session (BaselineProcess): take it all down
                    os.killpg(os.getpid(), signal.SIGTERM)
                    time.sleep(5.0)
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hydraserve bench baseline servers (loopback only)")
    parser.add_argument("name", choices=BASELINES)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--config", help="the composed hydraserve config as JSON (litserve_raw)")
    args = parser.parse_args(argv)
    _exit_with_parent()
    if args.name == "fastapi_echo":
        serve_fastapi_echo(args.port, args.path)
    else:
        config = json.loads(Path(args.config).read_text()) if args.config else {}
        serve_litserve_raw(args.port, args.path, config)


if __name__ == "__main__":
    main()
