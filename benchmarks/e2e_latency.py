"""End to end through HTTP: `experiment=cpu_low_latency` against the default config (issue 3, item 5).

    python benchmarks/e2e_latency.py            # writes benchmarks/results/e2e_latency.md
    python benchmarks/e2e_latency.py --quick

Both servers serve `model=minilm` on the CPU; every request sends `Cache-Control: no-cache`, so the
model runs each time (the cache is measured by benchmarks/cache.py). Concurrency 1, a single
sentence per request; p50/p99 from a raw keep-alive socket client, interleaved in rounds so drift
hits both alike. Quality: cosine between the two servers' embeddings over a few sentences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import latency_run, machine, write_results  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

BODY = b'{"input": "How do I reset my password on the new account page?"}'
SENTENCES = ["How do I reset my password?", "The quick brown fox jumps over the lazy dog.",
             "Quantization trades precision for speed.", "Latency matters for interactive users."]
CONFIGS = {"default": ["hardware=cpu"], "cpu_low_latency": ["experiment=cpu_low_latency"]}
NO_CACHE = {"Cache-Control": "no-cache"}


def embeddings(url: str) -> np.ndarray:
    r = httpx.post(url + "/predict", json={"input": SENTENCES}, headers=NO_CACHE, timeout=60)
    r.raise_for_status()
    return np.asarray(r.json()["embeddings"], dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="per round and config")
    args = parser.parse_args()
    rounds, n = (2, 60) if args.quick else (args.rounds, args.requests)
    servers = {name: ServerProcess([*overrides, "server.log_level=warning"], startup_timeout=900)
               for name, overrides in CONFIGS.items()}
    samples: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    try:
        for server in servers.values():
            server.start()
        infos = {name: httpx.get(s.url + "/info", timeout=30).json() for name, s in servers.items()}
        for _ in range(rounds):
            for name, server in servers.items():
                samples[name].append(latency_run(server.url, "/predict", BODY, n, warmup=20, headers=NO_CACHE))
        vectors = {name: embeddings(s.url) for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    a, b = vectors["default"], vectors["cpu_low_latency"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    p50 = {k: statistics.median(r["p50_ms"] for r in v) for k, v in samples.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in samples.items()}
    speedup = p50["default"] / p50["cpu_low_latency"]
    lines = ["# End to end: experiment=cpu_low_latency vs the default config (benchmarks/e2e_latency.py)", "",
             f"Command: `python benchmarks/e2e_latency.py{' --quick' if args.quick else ''}`  ",
             f"Machine: {machine()}; model=minilm on the CPU; one sentence per request, `Cache-Control: no-cache`; "
             f"concurrency 1; {rounds} interleaved rounds x {n} requests per config; median of round p50s.", "",
             "| config | p50 ms | p99 ms | speed-up vs default |", "| --- | ---: | ---: | ---: |"]
    for name in CONFIGS:
        lines.append(f"| {name} | {p50[name]:.2f} | {p99[name]:.2f} | {p50['default'] / p50[name]:.2f}x |")
    engine = infos["cpu_low_latency"]["engine"][0] if infos["cpu_low_latency"]["engine"] else {}
    lines += ["", f"Embeddings, cpu_low_latency vs default: cosine min {cos.min():.4f}, mean {cos.mean():.4f}.  ",
              f"Start-up quality gate of cpu_low_latency: {engine.get('quality')}", "",
              f"Goal: >= 2x faster p50 with cosine >= 0.99: **{speedup:.2f}x, cosine {cos.min():.4f}** "
              f"({'met' if speedup >= 2 and cos.min() >= 0.99 else 'NOT met'})."]
    path = write_results("e2e_latency" + ("_quick" if args.quick else ""), "\n".join(lines) + "\n",
                         {"p50_ms": p50, "p99_ms": p99, "cosine_min": float(cos.min()), "rounds": samples,
                          "machine": machine()})
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
