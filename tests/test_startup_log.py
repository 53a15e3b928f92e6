"""A worker's start-up report (quality gate, compilation, timings) is in the server log, not only in /info."""

from __future__ import annotations

import json
import re

import httpx

from framework.launch import ServerProcess


def test_worker_start_up_report_is_logged_at_info_when_the_worker_is_ready():
    with ServerProcess(["model=echo", "cache=none", "tracing=none", "hardware=cpu", "hardware.compile=off"]) as server:
        info = httpx.get(server.url + "/info", timeout=10).json()
        log = server.log_tail(400)
    lines = [line for line in log.splitlines() if "[hydraserve.worker][INFO] - worker 0 ready on cpu" in line]
    assert len(lines) == 1, log
    line = lines[0]
    for part in ("quantization=", "gate: not needed", "compile=off in", "warm-up", "start-up"):
        assert part in line, line
    report = json.loads(re.search(r"; report (\{.*\})$", line).group(1))
    assert report["quality_gate"] == "not needed: quantization leaves the numbers as loaded"
    assert report["compile_mode"] == "off" and "compile_ms" in report and "startup_ms" in report
    assert info["engine"] == [report]  # the line says what /info says
