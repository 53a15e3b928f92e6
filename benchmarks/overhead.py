"""Serving overhead of the request path against a plain FastAPI echo, in one run (issue 8).

    python benchmarks/overhead.py            # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick    # smoke test

Targets: plain FastAPI+uvicorn echo (the floor), raw LitServe 0.2.19 serving the echo model,
hydraserve `model=echo` with the stock LitServe transport, with the fast path (tracing off), and
with the fast path and `tracing=file`. Concurrency 1: p50/p99 from a raw keep-alive socket client.
16 connections: requests/s from wrk. Ratios are to the FastAPI echo measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import latency_run, machine, write_results, wrk_throughput  # noqa: E402
from framework.bench.baselines import BaselineProcess  # noqa: E402
from framework.config import compose, validate  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

BODY = b'{"input": "hello"}'
COMMON = ["model=echo", "cache=none", "batching=none", "hardware=cpu", "server.log_level=warning"]


def targets(tmp: str) -> list[tuple[str, object]]:
    echo_cfg = validate(compose(COMMON)).raw
    return [
        ("fastapi echo (floor)", lambda: BaselineProcess("fastapi_echo", {}, log_dir=tmp)),
        ("litserve 0.2.19 raw", lambda: BaselineProcess("litserve_raw", echo_cfg, log_dir=tmp)),
        ("hydraserve stock transport", lambda: ServerProcess([*COMMON, "server.transport=litserve", "tracing=none"])),
        ("hydraserve fast path", lambda: ServerProcess([*COMMON, "server.transport=fast", "tracing=none"])),
        ("hydraserve fast path + tracing=file",
         lambda: ServerProcess([*COMMON, "server.transport=fast", "tracing=file"])),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few requests, short wrk runs")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    n, seconds = (300, 3) if args.quick else (args.requests, args.seconds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in targets(tmp):
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(make())
                lat = latency_run(server.url, "/predict", BODY, n)
                thr = wrk_throughput(server.url, "/predict", BODY, connections=16, seconds=seconds)
            rows.append({"target": name, **lat, **thr})
            print(f"{name:<40} p50 {lat['p50_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms  {thr['rps']:.0f} req/s",
                  flush=True)
    floor = rows[0]
    lines = ["# Serving overhead (benchmarks/overhead.py)", "",
             f"Command: `python benchmarks/overhead.py{' --quick' if args.quick else ''}`  ",
             f"Machine: {machine()}; body `{BODY.decode()}`; concurrency 1: {n} requests after 200 warm-up, "
             f"raw keep-alive socket client; throughput: wrk, 16 connections, {seconds} s.", "",
             "| target | p50 ms | p99 ms | p50 / echo | req/s @16 | req/s / echo | non-2xx |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_ms'] / floor['p50_ms']:.2f}x "
                     f"| {r['rps']:.0f} | {r['rps'] / floor['rps']:.2f}x | {r['non_2xx']} |")
    fast = next(r for r in rows if r["target"] == "hydraserve fast path")
    lines += ["", f"Goals: fast path p50 <= 2x echo: **{fast['p50_ms'] / floor['p50_ms']:.2f}x**; "
              f"throughput at 16 connections >= 0.5x echo: **{fast['rps'] / floor['rps']:.2f}x**."]
    path = write_results("overhead" + ("_quick" if args.quick else ""), "\n".join(lines) + "\n",
                         {"rows": rows, "machine": machine(), "quick": args.quick})
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
