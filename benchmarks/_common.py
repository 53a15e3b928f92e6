"""Helpers shared by the benchmarks: a low-overhead blocking HTTP client, wrk, result files.

The client matters: at concurrency 1 on loopback a server answers in ~0.3 ms, so a client that
spends that much itself (httpx does) hides the differences being measured. This one writes raw
HTTP/1.1 on a keep-alive socket with TCP_NODELAY and reads exactly Content-Length bytes.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

RESULTS = Path(__file__).resolve().parent / "results"


class BlockingClient:
    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
        self.address = (host, int(port))
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
        try:
            return self._post(path, body, headers)
        except (ConnectionError, BrokenPipeError):
            # uvicorn closes a keep-alive connection idle for 5 s (e.g. while another target is measured)
            self.sock.close()
            self._connect()
            return self._post(path, body, headers)

    def _post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()
        self.sock.sendall(head + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        raw_head, _, rest = buf.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(hdrs.get("content-length", "0"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return status, hdrs, rest[:length]

    def close(self) -> None:
        self.sock.close()


def latency_run(url: str, path: str, body: bytes, n: int, warmup: int = 200,
                headers: dict | None = None) -> dict:
    """Closed loop, one request in flight: p50/p99 in ms."""
    client = BlockingClient(url)
    try:
        for _ in range(warmup):
            status, _, _ = client.post(path, body, headers)
            assert status == 200, status
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, _, _ = client.post(path, body, headers)
            samples.append(time.perf_counter() - t0)
            assert status == 200, status
    finally:
        client.close()
    samples.sort()
    return {"p50_ms": statistics.median(samples) * 1000, "p99_ms": samples[int(0.99 * (len(samples) - 1))] * 1000,
            "n": n}


def wrk_throughput(url: str, path: str, body: bytes, connections: int = 16, seconds: int = 10,
                   threads: int = 2) -> dict:
    """Requests/s at ``connections`` keep-alive connections, measured by wrk (C, so the client is cheap)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(body.decode())}\n")
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
                          url + path], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec"))
    errors = sum(int(p.split()[-1]) for p in out.splitlines() if "Non-2xx" in p)
    requests = next(int(line.split()[0]) for line in out.splitlines() if " requests in " in line)
    return {"rps": rps, "non_2xx": errors, "requests": requests, "connections": connections, "seconds": seconds}


def send_requests(url: str, requests: int, concurrency: int, body: bytes, path: str = "/predict") -> None:
    """``requests`` POSTs of ``body`` over ``concurrency`` keep-alive connections; any answer but 200
    raises (a benchmark must not count errors as work)."""
    import concurrent.futures

    def one_connection(n: int) -> None:
        client = BlockingClient(url)
        try:
            for _ in range(n):
                status, _, _ = client.post(path, body)
                if status != 200:
                    raise RuntimeError(f"the server answered {status}")
        finally:
            client.close()

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(one_connection, n) for n in shares]:
            future.result()


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def write_results(name: str, markdown: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat after ``(comm)``: state, ppid, pgrp, session, ... utime [11], stime [12]."""
    return stat.read_text().rsplit(")", 1)[1].split()


def session_cpu_seconds(session_id: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of one session: a server
    started by ``ServerProcess`` (its API processes, workers and manager). Linux only."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session_id:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) one live process has used so far. Linux only."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_STARTED = re.compile(rb"Started server process \[(\d+)\]")


def server_pids(server: Any) -> tuple[list[int], list[int]]:
    """(API process pids, worker pids) of a running ``ServerProcess`` (log level info or lower):
    uvicorn logs each API process as it starts, and ``/info`` lists the workers."""
    import httpx

    api = sorted({int(m) for m in _STARTED.findall(server.log_path.read_bytes())})
    info = httpx.get(server.url + "/info", timeout=120).json()
    workers = sorted(int(e["pid"]) for e in info.get("engine", []) if e.get("pid"))
    if not api or not workers:
        raise RuntimeError(f"could not find the server's processes (api {api}, workers {workers})")
    return api, workers


def cpu_per_request(session_id: int, load: Callable[[], dict]) -> dict:
    """Run ``load`` (which returns a dict with ``requests``, the requests served) against the server
    whose processes form session ``session_id`` and add ``cpu_us_per_request``: the CPU time those
    processes used until the machine is quiet again (work the server still owes afterwards, such as
    queued spans, is its cost too), per request. Steadier than requests/s on a shared machine: a
    slow minute lowers everyone's requests/s, not what a request costs."""
    before = session_cpu_seconds(session_id)
    out = load()
    wait_until_quiet()
    out["cpu_us_per_request"] = (session_cpu_seconds(session_id) - before) * 1e6 / max(out["requests"], 1)
    return out


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` starting at a different one each round: no configuration always follows the same
    neighbour (whose leftovers, a warm cache or a busy exporter, would always be charged to it)."""
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(busy_below: float = 0.1, window_s: float = 0.5, max_wait_s: float = 60.0) -> float:
    """Block until the machine's CPUs are mostly idle (busy fraction under ``busy_below`` over one
    ``window_s``), at most ``max_wait_s``; returns the seconds waited.

    Servers measured side by side are not idle just because no client talks to them: one that was
    saturated a moment ago may still be exporting its queued spans (or compacting a cache), and that
    work would be charged to whichever server is measured next. Linux only; elsewhere it returns 0.
    """
    if not Path("/proc/stat").exists():
        return 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        busy0, total0 = _busy_jiffies()
        time.sleep(window_s)
        busy1, total1 = _busy_jiffies()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return time.perf_counter() - start


class Variant(NamedTuple):
    name: str
    overrides: list[str]
    env: dict[str, str]
    code_root: str | None  # another checkout's framework, or None for this one


def parse_variant(text: str) -> Variant:
    """``NAME=override,override,...``; ``ENV:KEY=VALUE`` parts set an environment variable of that
    server and ``CODE:/path`` runs the framework of another checkout (an A/B of two commits)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"{text!r}: expected NAME=override,override,... (e.g. file=tracing=file)")
    parts = [p for p in rest.split(",") if p]
    overrides = [p for p in parts if not p.startswith(("ENV:", "CODE:"))]
    env = dict(p[4:].split("=", 1) for p in parts if p.startswith("ENV:"))
    roots = [p[5:] for p in parts if p.startswith("CODE:")]
    if roots and not (Path(roots[-1]) / "framework").is_dir():
        raise SystemExit(f"{text!r}: CODE:{roots[-1]} has no framework/ folder")
    return Variant(name, overrides, env, roots[-1] if roots else None)
