"""What tracing costs a request: `model=echo` with tracing none vs file vs otlp, in one run (issue 6).

    python benchmarks/tracing.py            # full run, writes benchmarks/results/tracing.md
    python benchmarks/tracing.py --quick    # smoke test (< ~60 s on a quiet machine), tracing_quick.md

The servers start together and are measured in interleaved rounds, in an order rotated each
round, so a slow minute of a shared machine hits every configuration alike; each figure is the
median over rounds. Each measurement waits until the CPUs are quiet: a server saturated a moment
ago keeps exporting its queued spans for a while, and that must not be charged to the next one.
Concurrency 1: p50/p99 from a raw keep-alive socket client. Saturation: requests/s
at 16 connections from wrk (or, without wrk, 16 asyncio raw-socket clients), and the server's CPU
time per request (all its processes, span export included). A second `tracing=none` server
(`none_again`) is measured like the others, so the table shows how far two identical servers
differ on this machine. `otlp` exports over
OTLP/HTTP (JSON, the default protocol) to a local receiver in its own process that only stores
bodies (decoded at the end to count spans), so the collector costs next to nothing during the
measurement. Goals (issue 20): file and otlp throughput >= 0.9x none; file p50 adds <= 0.1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    cpu_per_request,
    latency_run,
    machine,
    rotated,
    wait_until_quiet,
    write_results,
)
from framework.launch import ServerProcess  # noqa: E402

BODY = b'{"input": "hello"}'
COMMON = ["model=echo", "cache=none", "batching=none", "hardware=cpu", "server.log_level=warning"]
# none_again: a second, identical tracing=none server, measured like the others: how far two equal
# servers differ on this machine (the noise floor every other ratio must be read against).
# file_10pct: the same exporter recording 10% of new traces (tracing.sample_ratio), the knob for
# servers near saturation.
CONFIGS = ("none", "none_again", "file", "otlp", "file_10pct")
CONNECTIONS = 16


# ------------------------------------------------------------------------------------------ collector


class Receiver:
    """``tests/otlp_receiver.py --count`` in a subprocess: the OTLP endpoint and, at the end, a count."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "otlp_receiver.py"), "--count"],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "endpoint":
            self.proc.kill()
            raise RuntimeError(f"OTLP receiver did not start: {line}")
        self.endpoint = line[1]

    def stop(self) -> tuple[int, int]:
        """The spans and the POSTs that arrived (-1 when the receiver did not say)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        counts = dict(x.split() for x in out.splitlines() if x.startswith(("spans ", "posts ")))
        return int(counts.get("spans", -1)), int(counts.get("posts", -1))


# ------------------------------------------------------------------------------------------- load


def throughput(server: ServerProcess, seconds: float) -> dict:
    """Requests/s at CONNECTIONS keep-alive connections (wrk when installed, else asyncio sockets),
    and the server's CPU time per request (``cpu_per_request``)."""
    import shutil

    def load() -> dict:
        if shutil.which("wrk"):
            from benchmarks._common import wrk_throughput

            r = wrk_throughput(server.url, "/predict", BODY, connections=CONNECTIONS, seconds=max(int(seconds), 1))
            return {"rps": r["rps"], "errors": r["non_2xx"], "requests": r["requests"], "client": "wrk"}
        return asyncio.run(_asyncio_throughput(server.url, seconds)) | {"client": "asyncio"}

    return cpu_per_request(server.proc.pid, load)


async def _asyncio_throughput(url: str, seconds: float) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    done = errors = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                              if k.strip().lower() == b"content-length")
                await reader.readexactly(length)
                if head[9:12] == b"200":
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return {"rps": done / (time.perf_counter() - t0), "errors": errors, "requests": done + errors}


# -------------------------------------------------------------------------------------------- run


def start_all(receiver: Receiver) -> dict[str, ServerProcess]:
    overrides = {
        "none": ["tracing=none"],
        "none_again": ["tracing=none"],
        "file": ["tracing=file"],
        "otlp": ["tracing=otlp", f"tracing.endpoint={receiver.endpoint}"],
        "file_10pct": ["tracing=file", "tracing.sample_ratio=0.1"],
    }
    servers = {name: ServerProcess([*COMMON, *overrides[name]], startup_timeout=600) for name in CONFIGS}
    failures: dict[str, BaseException] = {}

    def start(name: str) -> None:
        try:
            servers[name].start()
        except BaseException as exc:  # reported below, after every start has finished
            failures[name] = exc

    threads = [threading.Thread(target=start, args=(n,)) for n in CONFIGS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        for s in servers.values():
            s.stop()
        raise RuntimeError(f"servers failed to start: {failures}")
    return servers


def count_spans(folder: str) -> int:
    from framework.traces_view import load_spans

    return sum(len(load_spans(p)) for p in Path(folder).rglob("traces.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test, not a claim")
    # Many short rounds rather than a few long ones: this VM's speed drifts by +-15% over tens of
    # seconds, so configurations are compared round by round, close together in time.
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=1000, help="per round, at concurrency 1")
    parser.add_argument("--seconds", type=int, default=3, help="per round, at saturation")
    args = parser.parse_args()
    rounds, n, seconds = (1, 300, 3) if args.quick else (args.rounds, args.requests, args.seconds)

    samples: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    receiver = Receiver()
    try:
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            servers = start_all(receiver)
            for s in servers.values():
                stack.callback(s.stop)
            print(f"{len(servers)} servers up in {time.perf_counter() - t0:.1f} s", flush=True)
            for r in range(rounds):
                for name in rotated(CONFIGS, r):
                    wait_until_quiet()  # the previous server's span backlog is exported before we measure
                    url = servers[name].url
                    lat = latency_run(url, "/predict", BODY, n, warmup=100 if args.quick else 300)
                    thr = throughput(servers[name], seconds)
                    samples[name].append({**lat, **thr})
                    print(f"round {r + 1}/{rounds} {name:<10} p50 {lat['p50_ms']:.3f} ms  "
                          f"p99 {lat['p99_ms']:.3f} ms  {thr['rps']:.0f} req/s ({thr['client']})  "
                          f"{thr['cpu_us_per_request']:.0f} CPU µs/request", flush=True)
            time.sleep(1.0)  # the last spans leave within tracing.flush_interval_ms (500)
        # Servers stopped (their exit flushes what was left); now count what arrived.
        file_spans = count_spans(servers["file"].output_dir)
        sampled_spans = count_spans(servers["file_10pct"].output_dir)
    finally:
        otlp_spans, otlp_posts = receiver.stop()
    return report(args, samples, rounds, n, seconds,
                  {"file": file_spans, "otlp": otlp_spans, "none": 0, "none_again": 0, "file_10pct": sampled_spans},
                  otlp_posts)


def report(args, samples: dict[str, list[dict]], rounds: int, n: int, seconds: int, spans: dict,
           otlp_posts: int) -> int:
    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def paired(name: str, key: str, op) -> float:
        # Per round against the same round's `none`, then the median: drift between rounds cancels.
        return statistics.median(op(s[key], b[key]) for s, b in zip(samples[name], samples["none"], strict=True))

    rows = []
    for name in CONFIGS:
        rows.append({"tracing": name, "p50_ms": med(name, "p50_ms"), "p99_ms": med(name, "p99_ms"),
                     "rps": med(name, "rps"), "errors": sum(s["errors"] for s in samples[name]),
                     "rps_ratio": paired(name, "rps", lambda a, b: a / b),
                     "p50_added_ms": paired(name, "p50_ms", lambda a, b: a - b),
                     "cpu_us": med(name, "cpu_us_per_request"),
                     "cpu_ratio": paired(name, "cpu_us_per_request", lambda a, b: a / b),
                     "spans": spans.get(name)})
    client = samples["none"][0]["client"]
    lines = [
        "# Tracing overhead (benchmarks/tracing.py)", "",
        *(["**Quick smoke run: one short round, not a claim.**", ""] if args.quick else []),
        f"Command: `python benchmarks/tracing.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine()}; `{' '.join(COMMON)}`; body `{BODY.decode()}`.  ",
        f"Concurrency 1: {n} requests per round, raw keep-alive socket client. Saturation: {CONNECTIONS} "
        f"connections for {seconds} s per round ({client}). Medians of {rounds} interleaved round(s) "
        "in rotated order; the servers run side by side, and each measurement starts once the machine is "
        "quiet again (the previous server has exported its span backlog). `req/s / none` and `p50 added` "
        "are medians of per-round comparisons with the same round's `none`. `CPU µs/req` is the "
        "server's CPU time (all its processes, span export included) per request at saturation. "
        "`none_again` is a second `tracing=none` server: its ratios show this machine's noise floor.", "",
        "| tracing | p50 ms | p99 ms | p50 added ms | req/s @16 | req/s / none | CPU µs/req | CPU / none "
        "| non-2xx | spans exported |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spans_cell = "-" if r["spans"] is None else str(r["spans"])
        lines.append(f"| {r['tracing']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_added_ms']:+.3f} "
                     f"| {r['rps']:.0f} | {r['rps_ratio']:.3f}x | {r['cpu_us']:.0f} | {r['cpu_ratio']:.3f}x "
                     f"| {r['errors']} | {spans_cell} |")
    file_row = next(r for r in rows if r["tracing"] == "file")
    otlp_row = next(r for r in rows if r["tracing"] == "otlp")
    floor = next(r for r in rows if r["tracing"] == "none_again")
    p50_ok = file_row["p50_added_ms"] <= 0.1

    def goal(row: dict) -> str:
        return f"**{row['rps_ratio']:.3f}x ({'met' if row['rps_ratio'] >= 0.9 else 'not met'})**"

    lines += [
        "",
        f"Goals: throughput >= 0.9x none, tracing=file: {goal(file_row)}, tracing=otlp: {goal(otlp_row)}; "
        f"file p50 added <= 0.1 ms: **{file_row['p50_added_ms']:+.3f} ms "
        f"({'met' if p50_ok else 'not met'})**. Noise floor (`none_again` vs `none`): throughput "
        f"{floor['rps_ratio']:.3f}x, p50 {floor['p50_added_ms']:+.3f} ms, CPU per request {floor['cpu_ratio']:.3f}x; "
        f"`file` costs {file_row['cpu_ratio']:.3f}x the CPU per request of `none`.",
        "",
        "Spans exported counts what reached the file / the collector (every request makes a server span "
        "and the worker's spans), so a configuration that silently exported nothing would show here. "
        f"The collector received them in {otlp_posts} POSTs "
        f"({otlp_row['spans'] / max(otlp_posts, 1):.0f} spans per POST).",
    ]
    data = {"rows": rows, "samples": samples, "machine": machine(), "quick": args.quick, "rounds": rounds,
            "requests": n, "seconds": seconds, "otlp_posts": otlp_posts}
    path = write_results("tracing" + ("_quick" if args.quick else ""), "\n".join(lines) + "\n", data)
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
