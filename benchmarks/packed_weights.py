"""Saturation throughput of the shipped embedding server with and without ``hardware.packed_weights``.

    python benchmarks/packed_weights.py                # 4 rounds, writes benchmarks/results/packed_weights.md
    python benchmarks/packed_weights.py --rounds 2 --seconds 3 --name packed_weights_quick

``model=minilm`` as shipped (dynamic batching, CPU), ``cache=none`` so every request runs the model, against
the same server with ``hardware.packed_weights=false``. One server at a time: each round starts one
config's server, warms it up, saturates it with wrk (16 keep-alive connections), stops it, then the other
(the order alternates per round, so a slow minute of a shared machine hits both alike). Reported: req/s
per round, the medians and the per-round ratio. Concurrency-1 latency of the same A/B is
``benchmarks/e2e_latency.py --config unpacked=hardware.packed_weights=false`` (results/e2e_latency_packed.md).
Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, write_results, wrk_throughput  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

COMMON = ["model=minilm", "cache=none", "server.log_level=warning"]
CONFIGS = {"packed (default)": [], "hardware.packed_weights=false": ["hardware.packed_weights=false"]}
BODY = b'{"input": "what is the latency of a request under load in this server?"}'
CONNECTIONS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=6, help="measured seconds per server per round")
    ap.add_argument("--name", default="packed_weights", help="results file name (benchmarks/results/NAME.md)")
    args = ap.parse_args()
    names = list(CONFIGS)
    rps: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            loads.append(os.getloadavg()[0])
            with ServerProcess(COMMON + CONFIGS[name]) as server:
                wrk_throughput(server.url, "/predict", BODY, CONNECTIONS, seconds=3)  # warm-up
                rps[name].append(wrk_throughput(server.url, "/predict", BODY, CONNECTIONS, args.seconds)["rps"])
            print(f"round {r + 1}/{args.rounds} {name}: {rps[name][-1]:.1f} req/s", flush=True)
    packed, plain = (rps[n] for n in names)
    ratios = [a / b for a, b in zip(packed, plain, strict=True)]
    cmd = " ".join(["python benchmarks/packed_weights.py", *sys.argv[1:]])
    md = "\n".join([
        "# Packed weights: MiniLM saturation throughput (benchmarks/packed_weights.py)",
        "",
        f"Command: `{cmd}`, {time.strftime('%Y-%m-%d')}; {machine()}; `{' '.join(COMMON)}`; wrk, {CONNECTIONS} "
        f"connections, {args.seconds} s per server per round, one server at a time, {args.rounds} rounds; "
        f"load average before each server {min(loads):.2f}-{max(loads):.2f}.",
        "",
        "| config | req/s per round | median req/s |",
        "| --- | --- | ---: |",
        *(f"| {n} | {', '.join(f'{v:.1f}' for v in rps[n])} | {statistics.median(rps[n]):.1f} |" for n in names),
        "",
        f"Packed / unpacked, per round: {', '.join(f'{x:.2f}x' for x in ratios)} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}x).",
        "",
    ])
    path = write_results(args.name, md, {"command": cmd, "rps": rps, "ratios": ratios, "loads": loads})
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
