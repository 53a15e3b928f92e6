"""Batching policies under open-loop load: ``none`` vs ``dynamic`` (two windows) vs ``adaptive``.

    python benchmarks/batching.py            # the full sweep (about 15 minutes; run it on a quiet machine)
    python benchmarks/batching.py --quick    # smoke test: three rates, short stages (~1 minute)

What it does, all in one run so every number has its baseline beside it:

1. Starts one real server per policy (``framework.launch.ServerProcess``, loopback), all at once so
   their model loads overlap; they are then measured one at a time (an idle server only sleeps).
2. Measures the unbatched capacity: ``batching=none`` driven at saturation (closed loop, many
   connections). Every policy gets the same saturation probe, which also warms it up and teaches
   the adaptive cost model the batch sizes it will see.
3. Sweeps fixed arrival rates from 10% to 120% of that capacity (open loop: each request has an
   intended send time and its latency is measured from it, so queueing is never hidden). In the
   full run, a policy that still meets the SLO at 120% is pushed further (1.5x, 2x, 2.5x, 3x) so
   "the highest rate it sustains" is measured rather than capped by the sweep.
4. Writes ``benchmarks/results/batching.md`` (+ ``.json`` and a ``.png`` plot): p50/p95/p99 and
   throughput per rate, the highest rate each policy sustains with p99 under the SLO, ratios to
   ``none``, and whether the adaptive policy met its three goals.

A rate is *sustained* when p99 <= SLO, at most 1% of requests fail and none is left unanswered
when the stage's drain time ends. (Latency runs from the intended send time, so a server that falls
behind shows it in p99 within the stage.) Speed claims come from this script, never from unit tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framework.bench.http_client import make_client  # noqa: E402
from framework.bench.load import LoadOptions, Stage, run_load  # noqa: E402
from framework.bench.workload import Workload, text_workload  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

POLICIES: dict[str, list[str]] = {
    "none": ["batching=none"],
    "dynamic_2ms": ["batching=dynamic", "batching.max_batch_size=32", "batching.max_delay_ms=2"],
    "dynamic_10ms": ["batching=dynamic", "batching.max_batch_size=32", "batching.max_delay_ms=10"],
    "adaptive": ["batching=adaptive", "batching.max_batch_size=32"],
}
BASELINE = "none"
FULL_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.2)
QUICK_FRACTIONS = (0.1, 0.5, 1.2)
EXTENSION = (1.5, 2.0, 2.5, 3.0)  # full run only, while a policy still sustains the previous rate
MAX_ERROR_RATE = 0.01


# ------------------------------------------------------------------------------------------- servers
def start_servers(common: list[str], names: list[str], startup_timeout: float) -> dict[str, ServerProcess]:
    """Start one server per policy in parallel; stop the started ones if any fails."""
    servers = {name: ServerProcess([*common, *POLICIES[name]], startup_timeout=startup_timeout)
               for name in names}
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = {name: pool.submit(server.start) for name, server in servers.items()}
        failed = []
        for name, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # report every failure, then stop whatever did start
                failed.append(f"{name}: {exc}")
    if failed:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        raise SystemExit("could not start the servers:\n" + "\n".join(failed))
    return servers


# ---------------------------------------------------------------------------------------- measuring
async def _saturate(url: str, workload: Workload, connections: int, seconds: float, client: str) -> dict:
    """Closed loop: ``connections`` clients each send back to back for ``seconds``; answers per second."""
    http = make_client(client, url, connections, 60.0)
    path = http.base_path + "/predict"
    counter = itertools.count()
    ok = failed = 0
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal ok, failed
        conn = http.connection()
        try:
            while time.perf_counter() < stop_at:
                req = workload.request(next(counter))
                try:
                    status, _, _ = await conn.request("POST", path, req.body, req.headers)
                except Exception:  # counted, never fatal
                    status = 0
                if 200 <= status < 300:
                    ok += 1
                else:
                    failed += 1
        finally:
            conn.close()

    began = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(connections)))
    finally:
        await http.aclose()
    elapsed = time.perf_counter() - began
    return {"throughput": round(ok / elapsed, 2), "ok": ok, "failed": failed, "seconds": round(elapsed, 2)}


def saturate(url: str, workload: Workload, connections: int, seconds: float, client: str) -> dict:
    return asyncio.run(_saturate(url, workload, connections, seconds, client))


def sweep(url: str, workload: Workload, rates: list[float], args: argparse.Namespace) -> list[dict]:
    options = LoadOptions(url=url, connections=args.connections, timeout_s=args.timeout_s,
                          drain_s=args.drain_s, slo_ms=args.slo_ms, client=args.client, seed=args.seed)
    # Low rates get longer stages, so every stage has enough requests for its percentiles.
    stages = [Stage(rate=r, duration_s=max(args.duration, args.min_requests / r), arrival=args.arrival)
              for r in rates]
    summaries = run_load(options, stages, workload).summaries()
    for s in summaries:
        s.pop("histogram", None)  # the report keeps percentiles, not the encoded histograms
    return summaries


def sustained(stage: dict, slo_ms: float) -> bool:
    p99 = (stage.get("latency_ms") or {}).get("p99")
    return (p99 is not None and p99 <= slo_ms and stage.get("error_rate", 1.0) <= MAX_ERROR_RATE
            and not stage.get("cancelled"))


def highest_sustained(stages: list[dict], slo_ms: float) -> tuple[float, bool]:
    """(highest offered rate such that it and every lower rate were sustained, whether the top was)."""
    best = 0.0
    ordered = sorted(stages, key=lambda s: s["offered_rate"])
    for stage in ordered:
        if not sustained(stage, slo_ms):
            return best, False
        best = stage["offered_rate"]
    return best, bool(ordered)


# ------------------------------------------------------------------------------------------ report
def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def evaluate(results: dict, capacity: float, slo_ms: float) -> dict:
    """The three goals of the adaptive policy, each with its numbers."""
    def stage_at(name: str, fraction: float) -> dict | None:
        rate = round(fraction * capacity, 3)
        return next((s for s in results[name]["stages"] if abs(s["offered_rate"] - rate) < 1e-6), None)

    goals = {}
    low_none, low_adaptive = stage_at(BASELINE, 0.1), stage_at("adaptive", 0.1)
    if low_none and low_adaptive:
        a, n = low_adaptive["latency_ms"]["p50"], low_none["latency_ms"]["p50"]
        goals["p50 at 10% load: adaptive <= 1.1x none"] = (
            a is not None and n is not None and a <= 1.1 * n, f"{_ms(a)} ms vs {_ms(n)} ms ({_ratio(a, n)})")
    dynamics = [results[k]["saturation"]["throughput"] for k in results if k.startswith("dynamic")]
    if dynamics:
        a, d = results["adaptive"]["saturation"]["throughput"], max(dynamics)
        goals["saturation throughput: adaptive >= 0.95x best dynamic"] = (
            a >= 0.95 * d, f"{a:.1f} vs {d:.1f} req/s ({_ratio(a, d)})")
    a_rate, a_top = results["adaptive"]["sustained"]
    n_rate, _ = results[BASELINE]["sustained"]
    shown = f"{'>= ' if a_top else ''}{a_rate:.1f} vs {n_rate:.1f} req/s"
    goals[f"highest rate with p99 <= {slo_ms:g} ms: adaptive >= 2x none"] = (
        a_rate >= 2 * n_rate and a_rate > 0, f"{shown} ({_ratio(a_rate, n_rate)})")
    return goals


def write_report(path: Path, meta: dict, results: dict, goals: dict) -> None:
    slo = meta["slo_ms"]
    cap = meta["capacity_none"]
    lines = [
        "# Batching policies under open-loop load",
        "",
        f"{'**QUICK RUN: a smoke test, not a measurement.** ' if meta['quick'] else ''}"
        f"Generated by `python benchmarks/batching.py{' --quick' if meta['quick'] else ''}` on "
        f"{meta['date']} ({meta['machine']}).",
        "",
        f"- model: `{meta['model']}` ({meta['common']}), one inference worker, cache off",
        f"- unbatched capacity (`batching=none` at saturation, {meta['saturation_connections']} "
        f"connections): **{cap:.1f} req/s**; offered rates are fractions of it",
        f"- open loop, {meta['arrival']} arrivals, {meta['duration_s']:g} s per rate, latency from each "
        f"request's intended send time; client `{meta['client']}` with {meta['connections']} connections",
        f"- SLO: p99 <= {slo:g} ms; a rate is *sustained* when p99 meets it with <= {MAX_ERROR_RATE:.0%} "
        "errors and every request answered",
        "",
        "## Summary (ratios to `none`)",
        "",
        "| policy | settings | saturation throughput (req/s) | ratio | highest sustained rate (req/s) "
        f"| ratio | p50 at {meta['fractions'][0]:.0%} load (ms) | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results[BASELINE]
    base_low = base["stages"][0]["latency_ms"]["p50"] if base["stages"] else None
    for name, res in results.items():
        rate, top = res["sustained"]
        low = res["stages"][0]["latency_ms"]["p50"] if res["stages"] else None
        settings = " ".join(o for o in POLICIES[name] if not o.startswith("batching="))
        lines.append(
            f"| {name} | {settings or '-'} | {res['saturation']['throughput']:.1f} "
            f"| {_ratio(res['saturation']['throughput'], base['saturation']['throughput'])} "
            f"| {'>= ' if top else ''}{rate:.1f} | {_ratio(rate, base['sustained'][0])} "
            f"| {_ms(low)} | {_ratio(low, base_low)} |")
    lines += ["", "## Goals of `batching=adaptive`", ""]
    for goal, (ok, detail) in goals.items():
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {goal} — {detail}")
    lines += ["", "## Every rate", "",
              "Latency in ms (p50 / p95 / p99), throughput in answered req/s; `*` marks a sustained rate.",
              "",
              "| load | offered (req/s) | " + " | ".join(results) + " |",
              "| ---: | ---: | " + " | ".join("---" for _ in results) + " |"]
    rates = sorted({s["offered_rate"] for r in results.values() for s in r["stages"]})
    for rate in rates:
        cells = []
        for res in results.values():
            stage = next((s for s in res["stages"] if s["offered_rate"] == rate), None)
            if stage is None:
                cells.append("")
                continue
            lat = stage["latency_ms"]
            mark = "*" if sustained(stage, slo) else ""
            errors = f", {stage['error_rate']:.0%} err" if stage.get("error_rate") else ""
            cells.append(f"{_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])}{mark}, "
                         f"{stage['throughput']:.0f}/s{errors}")
        lines.append(f"| {rate / cap:.0%} | {rate:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Raw numbers: `" + path.with_suffix(".json").name + "`; plot: `"
              + path.with_suffix(".png").name + "`.", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, results: dict, slo_ms: float, capacity: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # One colour, marker and line style per policy, each nudged a little along x and drawn a little
    # smaller than the one before it: where policies coincide (all answer what is offered below
    # capacity) every one of them still shows.
    styles = (("tab:blue", "o", "-", 9), ("tab:orange", "s", "--", 7.5), ("tab:green", "^", "-.", 7),
              ("tab:red", "D", ":", 5), ("tab:purple", "v", "-", 5), ("tab:brown", "P", "--", 5))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    n = len(results)
    top = 0.0
    for k, (name, res) in enumerate(results.items()):
        colour, marker, style, size = styles[k % len(styles)]
        nudge = (k - (n - 1) / 2) * 0.012
        pts = [(s["offered_rate"] / capacity, s["latency_ms"]["p99"], s["throughput"]) for s in res["stages"]
               if s["latency_ms"]["p99"] is not None]
        if not pts:
            continue
        xs = [p[0] + nudge for p in pts]
        top = max(top, *(p[0] for p in pts))
        kw = {"marker": marker, "linestyle": style, "color": colour, "markersize": size, "linewidth": 1.4,
              "markerfacecolor": colour if k % 2 == 0 else "white", "markeredgewidth": 1.4, "label": name}
        ax1.plot(xs, [p[1] for p in pts], **kw)
        ax2.plot(xs, [p[2] for p in pts], **kw)
    ax1.axhline(slo_ms, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax2.plot([0, top], [0, top * capacity], color="lightgrey", linewidth=1, zorder=0, label="offered")
    ax1.set(yscale="log", xlabel="offered load (x unbatched capacity)", ylabel="p99 latency (ms, log)",
            title=f"p99 latency per batching policy (SLO {slo_ms:g} ms)")
    ax2.set(xlabel="offered load (x unbatched capacity)", ylabel="answered req/s",
            title=f"answered req/s per policy (unbatched capacity {capacity:.1f} req/s)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 3 rates, short stages, no extension")
    p.add_argument("--model", default="minilm", help="model config group option (default minilm)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency objective (default 100)")
    p.add_argument("--duration", type=float, help="seconds per offered rate (default 10, quick 1)")
    p.add_argument("--saturation-s", type=float, help="seconds per saturation probe (default 8, quick 1.5)")
    p.add_argument("--warmup-s", type=float, help="unmeasured closed-loop load first (default 5, quick 1)")
    p.add_argument("--min-requests", type=int, help="requests per stage at least (default 50, quick 5)")
    p.add_argument("--fractions", help="comma-separated fractions of the unbatched capacity to offer")
    p.add_argument("--arrival", choices=("constant", "poisson"), default="constant")
    p.add_argument("--connections", type=int, default=256, help="open-loop connection pool size")
    p.add_argument("--saturation-connections", type=int, default=64)
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="HTTP client of the load generator (raw asyncio HTTP/1.1 or httpx)")
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--drain-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated subset of {', '.join(POLICIES)} (none and adaptive are always run)")
    p.add_argument("--out", type=Path,
                   help="markdown report (default benchmarks/results/batching[-quick].md)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every server, e.g. hardware=cpu")
    args = p.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 10.0)
    args.saturation_s = args.saturation_s or (1.5 if args.quick else 8.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.0 if args.quick else 5.0)
    args.min_requests = args.min_requests or (5 if args.quick else 50)
    if args.quick:
        args.drain_s = min(args.drain_s, 10.0)
    default = QUICK_FRACTIONS if args.quick else FULL_FRACTIONS
    fractions = args.fractions.split(",") if args.fractions else default
    args.fractions = sorted(float(f) for f in fractions)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(POLICIES))
    if unknown:
        p.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    args.policies = [n for n in POLICIES if n in set(names) | {BASELINE, "adaptive"}]
    results_dir = ROOT / "benchmarks" / "results"
    args.out = args.out or results_dir / ("batching-quick.md" if args.quick else "batching.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = [f"model={args.model}", "cache=none", *args.overrides]
    began = time.perf_counter()
    n_requests = 20_000 if not args.quick else 2_000
    workload = text_workload(n_requests, seed=args.seed)
    print(f"starting {len(args.policies)} servers ({', '.join(args.policies)}) ...", flush=True)
    servers = start_servers(common, args.policies, args.startup_timeout)
    print(f"servers ready after {time.perf_counter() - began:.1f} s", flush=True)
    results: dict[str, dict] = {}
    try:
        base = servers[BASELINE]
        if args.warmup_s > 0:  # the first requests pay for lazy initialisation: never measure them
            saturate(base.url, workload, args.saturation_connections, args.warmup_s, args.client)
        sat = saturate(base.url, workload, args.saturation_connections, args.saturation_s, args.client)
        capacity = sat["throughput"]
        if capacity <= 0:
            raise SystemExit(f"batching=none answered nothing at saturation ({sat}); see {base.log_path}")
        print(f"unbatched capacity: {capacity:.1f} req/s", flush=True)
        rates = [round(f * capacity, 3) for f in args.fractions]
        for name in args.policies:
            url = servers[name].url
            if name != BASELINE and args.warmup_s > 0:
                saturate(url, workload, args.saturation_connections, args.warmup_s, args.client)
            # The saturation probe also gives the adaptive cost model its first large batches.
            sat_name = sat if name == BASELINE else saturate(url, workload, args.saturation_connections,
                                                             args.saturation_s, args.client)
            print(f"[{name}] saturation {sat_name['throughput']:.1f} req/s; sweeping {len(rates)} rates",
                  flush=True)
            stages = sweep(url, workload, rates, args)
            if not args.quick and stages and highest_sustained(stages, args.slo_ms)[1]:
                for factor in EXTENSION:
                    more = sweep(url, workload, [round(factor * capacity, 3)], args)
                    stages += more
                    if not sustained(more[0], args.slo_ms):
                        break
            results[name] = {"saturation": sat_name, "stages": stages,
                             "sustained": highest_sustained(stages, args.slo_ms)}
            for s in stages:
                lat = s["latency_ms"]
                print(f"  {s['offered_rate']:8.1f} req/s  p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])} ms  "
                      f"throughput {s['throughput']:.1f}  errors {s['error_rate']:.1%}", flush=True)
    finally:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()

    goals = evaluate(results, capacity, args.slo_ms)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "model": args.model, "common": " ".join(common), "quick": args.quick, "slo_ms": args.slo_ms,
        "capacity_none": capacity, "fractions": args.fractions, "duration_s": args.duration,
        "arrival": args.arrival, "client": args.client, "connections": args.connections,
        "saturation_connections": args.saturation_connections,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, meta, results, goals)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "results": results,
         "goals": {k: {"pass": ok, "detail": d} for k, (ok, d) in goals.items()}}, indent=2))
    plot(args.out.with_suffix(".png"), results, args.slo_ms, capacity)
    print(args.out.read_text())
    print(f"wrote {args.out} in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
