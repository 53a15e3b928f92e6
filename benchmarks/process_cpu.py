"""Which process limits throughput: each server process's CPU share at saturation.

    python benchmarks/process_cpu.py none=model=echo,tracing=none file=model=echo,tracing=file
    python benchmarks/process_cpu.py none=model=minilm,tracing=none file=model=minilm,tracing=file

A server is an API process (HTTP, JSON, tracing's request spans) and inference workers (the model).
The one at 100% of a core bounds requests/s, so a cost matters there and hardly anywhere else: with
echo the API process is the bottleneck, with a real model the worker is. Each variant
(``NAME=override,...``, as in ``server_cpu.py``) is started in turn, saturated with wrk (16
connections) and its processes' CPU time read from /proc. One run each: a quick look, not a ratio
to quote (``tracing.py`` and ``instructions.py`` measure those). Needs wrk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    parse_variant,
    process_cpu_seconds,
    server_pids,
    wait_until_quiet,
    wrk_throughput,
)
from framework.launch import ServerProcess  # noqa: E402

COMMON = ["cache=none", "hardware=cpu", "server.log_level=info"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="NAME=override,override,...")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    print("| variant | req/s @16 | API process CPU | workers CPU |\n| --- | ---: | ---: | ---: |")
    for v in map(parse_variant, args.variants):
        with ServerProcess([*COMMON, *v.overrides], env=v.env, code_root=v.code_root, startup_timeout=600) as server:
            api, workers = server_pids(server)
            wrk_throughput(server.url, "/predict", b'{"input": "hello"}', connections=16, seconds=1)  # warm-up
            wait_until_quiet()
            before = {p: process_cpu_seconds(p) for p in api + workers}
            started = time.monotonic()
            result = wrk_throughput(server.url, "/predict", b'{"input": "hello"}', connections=16,
                                    seconds=args.seconds)
            elapsed = time.monotonic() - started

            def share(pids: list[int], before: dict = before, elapsed: float = elapsed) -> str:
                return f"{100 * sum(process_cpu_seconds(p) - before[p] for p in pids) / elapsed:.0f}%"

            print(f"| {v.name} | {result['rps']:.0f} | {share(api)} | {share(workers)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
