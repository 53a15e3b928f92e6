"""Real services for tests, started on free loopback ports in a test's tmp folder: redis-server, nginx.

Debian's binaries (``apt-get install redis-server nginx``; ``.ci/run`` installs them). When a binary is
missing this tries to install it (as root, with apt-get); if that is impossible the test is skipped
with the reason, never failed.

    url, proc = start_redis(tmp_path)                       # redis://127.0.0.1:PORT/0
    url, proc = start_redis(tmp_path, password="s3cret")    # redis://:s3cret@127.0.0.1:PORT/0
    url, proc = start_nginx(tmp_path, ["127.0.0.1:8001", "127.0.0.1:8002"])
    stop(proc)

Each process is started in its own session and ended by ``stop`` (by its pid only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

_PACKAGES = {"redis-server": "redis-server", "nginx": "nginx"}
_install_tried: set[str] = set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary(name: str) -> str:
    """The path of ``name`` (looked up in PATH and /usr/sbin), installing its package if need be."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if found:
        return found
    if name not in _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried.add(name)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", _PACKAGES[name]],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
        if found:
            return found
    pytest.skip(f"{name} is not installed and cannot be installed here (apt-get install {_PACKAGES[name]})")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """End ``proc`` (by its pid), then SIGKILL it if it is still there after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def start_redis(tmp_path: Path, password: str | None = None, port: int | None = None,
                extra: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """A redis-server on 127.0.0.1 (nothing saved to disk); returns ``(url, process)``."""
    exe = binary("redis-server")
    port = port or free_port()
    folder = Path(tmp_path) / f"redis-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(folder), "--daemonize", "no", "--logfile", str(folder / "redis.log"),
           "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]
    if password:
        cmd += ["--requirepass", password]
    cmd += list(extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, proc, what="redis-server")
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{port}/0", proc


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream hydraserve {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://hydraserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
            # non_idempotent: nginx never retries a POST that reached a server otherwise; an inference
            # request is safe to run twice (same input, same answer), so a replica dying mid-request
            # is retried on the other one instead of answering 502.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
        }}
    }}
}}
"""


def nginx_conf(folder: Path, port: int, upstreams: list[str], fail_timeout_s: int = 5) -> str:
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout={fail_timeout_s}s;" for u in upstreams)
    return NGINX_CONF.format(folder=folder, port=port, servers=servers)


def start_nginx(tmp_path: Path, upstreams: list[str], port: int | None = None) -> tuple[str, subprocess.Popen]:
    """nginx in the foreground (``daemon off;``) proxying to ``upstreams`` (``host:port``); returns
    ``(url, process)``. Its config, pid and logs are in ``tmp_path/nginx-PORT``."""
    exe = binary("nginx")
    port = port or free_port()
    folder = Path(tmp_path) / f"nginx-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(nginx_conf(folder, port, upstreams))
    # -p: the prefix (relative paths), -e: the error log before the config is read (not /var/log).
    proc = subprocess.Popen([exe, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, proc, what="nginx")
    except RuntimeError as exc:
        log = (folder / "error.log").read_text(errors="replace") if (folder / "error.log").exists() else ""
        raise RuntimeError(f"{exc}\n{log[-2000:]}") from None
    return f"http://127.0.0.1:{port}", proc
