"""Issue 15, items 2, 5 and 8 (parts): a dead API process, slow clients, the queue-depth gauge,
clients that leave mid-body. Each test starts a real echo server on loopback; every wait is bounded."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import time

import httpx
import orjson
import pytest

ECHO = ["model=echo", "cache=none", "tracing=none"]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)  # no read in these tests may wait longer (the server's bounds are ~1 s)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def test_a_killed_api_process_stops_the_server_loudly_and_nothing_hangs(serve):
    server = serve(ECHO)
    with httpx.Client(base_url=server.url, timeout=2) as client:
        api_pid = client.get("/info").json()["api_process"]["pid"]
        assert api_pid != server.proc.pid
        os.kill(api_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            started = time.monotonic()
            try:  # every request ends (answer, refusal or client timeout): none is left hanging
                client.get("/health")
            except httpx.HTTPError:
                pass
            assert time.monotonic() - started < 5
            time.sleep(0.1)
    code = server.proc.wait(timeout=5)
    assert code != 0
    log = server.log_path.read_text(errors="replace")
    assert "API process" in log and f"(pid {api_pid}) died" in log, server.log_tail()
    with pytest.raises(httpx.ConnectError):  # the port is closed: a supervisor can start a new server
        httpx.get(server.url + "/health", timeout=2)


@pytest.fixture(scope="module")
def slow_server(serve_module):
    return serve_module([*ECHO, "server.header_timeout_s=1", "server.body_timeout_s=1",
                         "server.max_connections=8"])


def test_headers_sent_a_byte_at_a_time_get_408_and_the_connection_closes(slow_server):
    sock = _connect(slow_server.port)
    started = time.monotonic()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    try:
        for byte in request:  # dribble, never finishing the headers, until the server answers
            if select.select([sock], [], [], 0.05)[0] or time.monotonic() - started > 8:
                break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = _read_all(sock)
    finally:
        sock.close()
    assert time.monotonic() - started < 8  # header_timeout_s=1, not held for ever
    assert reply.startswith(b"HTTP/1.1 408"), reply
    body = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "error" in body and "header_timeout_s" in body["detail"]


def test_a_connection_that_sends_nothing_is_closed(slow_server):
    sock = _connect(slow_server.port)
    started = time.monotonic()
    try:
        assert _read_all(sock) == b""
    finally:
        sock.close()
    assert time.monotonic() - started < 8


def test_a_stalled_body_gets_408_with_the_json_error_body(slow_server):
    sock = _connect(slow_server.port)
    started = time.monotonic()
    try:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"input\": ")
        reply = _read_all(sock)  # the server answers and closes; the body's end never comes
    finally:
        sock.close()
    assert time.monotonic() - started < 8
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    parsed = orjson.loads(body)
    assert set(parsed) == {"error", "detail"} and "body_timeout_s" in parsed["error"]
    with httpx.Client(base_url=slow_server.url, timeout=5) as client:  # the server is unharmed
        assert client.post("/predict", json={"input": "hi"}).status_code == 200


def test_connections_beyond_max_connections_get_503_and_the_server_still_serves(slow_server):
    held = [_connect(slow_server.port) for _ in range(8)]
    try:
        time.sleep(0.2)  # let the API process accept them
        extra = _connect(slow_server.port)
        try:
            reply = _read_all(extra)
        finally:
            extra.close()
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert b"retry-after:" in reply.lower()
        assert "max_connections" in orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["detail"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=slow_server.url, timeout=5) as client:
        while True:  # the held sockets' slots free up once the server sees them closed
            r = client.get("/health")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_queue_depth_returns_to_zero_when_idle(slow_server):
    server = slow_server
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(5):
            assert client.post("/predict", json={"input": "hi"}).status_code == 200
        text = client.get("/metrics").text
    assert _metric(text, "hydraserve_queue_depth") == 0


def test_a_client_leaving_mid_body_is_counted_not_logged_as_an_error(slow_server):
    def disconnects() -> float:
        return _metric(httpx.get(slow_server.url + "/metrics", timeout=5).text,
                       "hydraserve_client_disconnects_total")

    before = disconnects()
    sock = _connect(slow_server.port)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"input\": ")
    time.sleep(0.2)  # the handler is now waiting for the rest of the body
    sock.close()
    deadline = time.monotonic() + 10
    while disconnects() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert disconnects() == before + 1
    log = slow_server.log_path.read_text(errors="replace")
    assert "ClientDisconnect" not in log and "Traceback" not in log, slow_server.log_tail()
