"""Stopping a server: `kill` (SIGTERM) stops it as Ctrl-C does, and nothing it started outlives it.

Before, SIGTERM to the main process (what systemd, `docker stop` and Kubernetes send) left the API
processes serving on the port and the inference workers holding their memory, orphaned. After a
SIGKILL (the OOM killer), the children follow their parent on their own: the API processes, the
worker, and LitServe's Manager process, which had inherited the listening socket and kept the port.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest

from framework.launch import ServerProcess


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = _stat(pid)  # a zombie waiting for its (dead) parent's reaper counts as gone
    return stat is not None and stat[0] != "Z"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and int(stat[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the server's processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_process_outlives_a_stopped_server(tmp_path, sig):
    server = ServerProcess(["model=echo", "cache=none", "tracing=none", "batching=none"],
                           output_dir=str(tmp_path)).start()
    try:
        worker = httpx.get(server.url + "/info").json()["engine"][0]["pid"]
        main = server.proc.pid
        children = _children_of(main)
        assert worker in children and len(children) >= 2  # the worker and at least one API process
        os.kill(main, sig)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (server.proc.poll() is None or _port_open(server.port)
                                               or any(_alive(p) for p in [worker, *children])):
            time.sleep(0.2)
        survivors = [p for p in [worker, *children] if _alive(p)]
        assert not survivors, f"still running after {sig.name}: {survivors}"
        assert not _port_open(server.port)
        if sig == signal.SIGTERM:
            assert server.proc.returncode is not None
            assert "Traceback" not in server.log_path.read_text(errors="replace")
    finally:
        server.stop()


def test_gc_is_tuned_in_every_serving_process_and_can_be_turned_off(serve):
    tuned = httpx.get(serve(["model=echo", "cache=none", "tracing=none"]).url + "/info").json()
    for process in (tuned["api_process"], tuned["engine"][0]):
        assert process["gc"]["thresholds"] == [20000, 50, 100]
        assert process["gc"]["frozen_objects"] > 1000  # the app / the model, out of every collection
    stock = httpx.get(serve(["model=echo", "cache=none", "tracing=none", "server.gc_freeze=false",
                             "server.gc_thresholds=null"]).url + "/info").json()
    assert stock["api_process"]["gc"]["frozen_objects"] == 0
    assert stock["engine"][0]["gc"]["thresholds"] == [700, 10, 10]


def test_bad_gc_thresholds_name_the_key():
    from framework.config import compose, validate
    from framework.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate(compose(["model=echo", "server.gc_thresholds=[1000,0]"]))
    (problem,) = [p for p in info.value.problems if p.key == "server.gc_thresholds"]
    assert "three positive integers" in problem.message and "null" in problem.message
