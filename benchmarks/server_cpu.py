"""What a configuration costs the server per request: CPU time, A/B, interleaved rounds.

    python benchmarks/server_cpu.py none=tracing=none file=tracing=file
    python benchmarks/server_cpu.py --rounds 12 a=tracing=file b=tracing=file,tracing.sample_ratio=0.1
    python benchmarks/server_cpu.py off=tracing=file on=tracing=file,ENV:MY_FLAG=1   # env vars too
    python benchmarks/server_cpu.py old=tracing=file,CODE:/tmp/old new=tracing=file  # another checkout

Each argument is ``NAME=override,override,...`` (``ENV:KEY=VALUE`` sets an environment variable of
that server; ``CODE:/path`` runs the framework of another checkout, e.g. ``git worktree add /tmp/old
main``). Every server serves ``model=echo`` side by side; each round saturates each of them in
turn with wrk (16 connections) and reads the CPU time all its processes used until the machine is
quiet again, divided by the requests served. CPU per request is steadier than requests/s on a
shared machine (a slow minute lowers everyone's req/s, not what a request costs), but this VM still
varies by +-15% between rounds: compare medians over many rounds, and list the same configuration
twice to see the noise floor. Needs wrk (apt-get install wrk). Prints the table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import cpu_per_request, parse_variant, rotated, wait_until_quiet, wrk_throughput  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

COMMON = ["model=echo", "cache=none", "batching=none", "hardware=cpu", "server.log_level=warning"]
BODY = b'{"input": "hello"}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="NAME=override,override,... (at least two)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3, help="per server per round")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    servers = {v.name: ServerProcess([*COMMON, *v.overrides], env=v.env, code_root=v.code_root, startup_timeout=600)
               for v in variants}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for s in servers.values():
            s.start()
        names = list(servers)
        for r in range(args.rounds):
            for name in rotated(names, r):
                server = servers[name]
                wait_until_quiet()
                result = cpu_per_request(server.proc.pid, lambda s=server: wrk_throughput(
                    s.url, "/predict", BODY, connections=16, seconds=args.seconds))
                cpu[name].append(result["cpu_us_per_request"])
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {cpu[n][-1]:.0f}" for n in names), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    base = variants[0].name
    print(f"\n| variant | CPU µs/request (median of {args.rounds}) | vs {base} (median of per-round ratios) |")
    print("| --- | ---: | ---: |")
    for name in cpu:
        ratio = statistics.median(a / b for a, b in zip(cpu[name], cpu[base], strict=True))
        print(f"| {name} | {statistics.median(cpu[name]):.0f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
