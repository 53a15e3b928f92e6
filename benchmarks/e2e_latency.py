"""End to end through HTTP, as a user sees it: each config's server alone on the machine (issue 21).

    python benchmarks/e2e_latency.py                 # default vs experiment=cpu_low_latency, 5 rounds
    python benchmarks/e2e_latency.py --quick         # 2 rounds x 100 requests
    python benchmarks/e2e_latency.py --config ort=hardware.runtime=onnxruntime --rounds 3
    python benchmarks/e2e_latency.py --neighbour     # the same, beside a process that keeps one core busy
    python benchmarks/e2e_latency.py --same-start    # the control: one start each, measured 5 times 30 s apart

Every config serves `model=minilm` on the CPU. One server at a time: each round starts a config's
server, measures it, stops it, then does the same for the next config (the order rotates per round),
so no idle server's threads share the cores with the measured one and every round is a new start
(the start-to-start spread is part of the result). The first start of each config uses an empty
compile/export cache (a temporary `hardware.compile_cache_dir`), the later ones reuse it: the table
shows the first and a second start-up time.

Every request sends `Cache-Control: no-cache` (the model runs each time) and a `traceparent` with a
trace id of its own, so its client-side time is matched with its server spans in the traces file
(`tracing=file`). The stage table is the median over requests of each stage: decode / cache / encode
are what the API process spends outside the worker (server span minus queue wait and batch), queue is
`queue.wait`, tokenize `preprocess`, forward `model.forward`, postprocess `postprocess`, and the
client gap is the client's time minus the server span (HTTP parsing, loopback, the event loop).
Quality: cosine of each config's embeddings to the default's over a few sentences.

Timing is only meaningful on a quiet machine: the load average is printed beside every round.
``--neighbour`` starts a busy loop (one process, one core: a noisy neighbour on a shared host) after the
server is up and the machine is quiet, and stops it after the measured requests: what a config costs
when it does not have the cores to itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402

from benchmarks._common import BlockingClient, machine, parse_variant, rotated, wait_until_quiet, write_results  # noqa: E402
from framework.launch import ServerFailedToStart, ServerProcess  # noqa: E402

BODY = b'{"input": "How do I reset my password on the new account page?"}'
SENTENCES = ["How do I reset my password?", "The quick brown fox jumps over the lazy dog.",
             "Quantization trades precision for speed.", "Latency matters for interactive users."]
DEFAULT_CONFIGS = {"default": [], "cpu_low_latency": ["experiment=cpu_low_latency"]}
NO_CACHE = {"Cache-Control": "no-cache"}
STAGES = ("api_other", "cache", "queue", "tokenize", "forward", "postprocess", "worker_other", "client_gap")
STAGE_SPANS = {"cache": ("cache.lookup", "cache.store"), "queue": ("queue.wait",), "tokenize": ("preprocess",),
               "forward": ("model.forward",), "postprocess": ("postprocess",)}


# ------------------------------------------------------------------------------------------------- traces
def _otlp_id(value: Any) -> str | None:
    """OTLP/JSON ids are hex strings; some writers emit protobuf-JSON base64 instead: accept both."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    with contextlib.suppress(ValueError):
        return base64.b64decode(value).hex()
    return None


def _otlp_spans(obj: dict) -> list[dict]:
    out = []
    for resource_spans in obj.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    out.append({"trace_id": _otlp_id(span["traceId"]), "span_id": _otlp_id(span["spanId"]),
                                "parent_span_id": _otlp_id(span.get("parentSpanId")), "name": span["name"],
                                "start_ns": int(span["startTimeUnixNano"]), "end_ns": int(span["endTimeUnixNano"])})
    return out


def spans_of_line(line: bytes) -> list[dict]:
    """Spans (``trace_id``, ``span_id``, ``parent_span_id``, ``name``, ``start_ns``, ``end_ns``) of one
    line of a traces file: OTLP/JSON (``resourceSpans`` / ``scopeSpans`` / ``spans``, times as strings of
    nanoseconds) or, while it still exists, hydraserve's earlier chunk format (read by traces_view)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(obj, dict):
        return []
    if "resourceSpans" in obj:
        return _otlp_spans(obj)
    try:
        from framework.traces_view import spans_of_line as old_format
    except ImportError:
        return []
    try:
        return old_format(line)
    except Exception:  # a format the old reader no longer understands is not ours to fix here
        return []


def load_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [s for line in path.read_bytes().splitlines() if line.strip() for s in spans_of_line(line)]


def stage_breakdown(spans: list[dict], client_ms: dict[str, float]) -> dict[str, float]:
    """Median ms per stage over the requests whose trace ids are in ``client_ms``."""
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        if s["trace_id"] in client_ms:
            by_trace[s["trace_id"]].append(s)
    per_stage: dict[str, list[float]] = defaultdict(list)
    for trace_id, trace in by_trace.items():
        ids = {s["span_id"] for s in trace}
        roots = [s for s in trace if s.get("parent_span_id") not in ids]
        server = next((s for s in roots if s["name"].startswith("POST ")), None)
        if server is None:
            continue
        ms = {name: sum((s["end_ns"] - s["start_ns"]) / 1e6 for s in trace if s["name"] in names)
              for name, names in STAGE_SPANS.items()}
        batch = sum((s["end_ns"] - s["start_ns"]) / 1e6 for s in trace if s["name"] == "batch")
        total = (server["end_ns"] - server["start_ns"]) / 1e6
        # decode, encode, the hop to the worker and back: the server span's time outside cache/queue/batch
        ms["api_other"] = total - ms["cache"] - ms["queue"] - batch
        ms["worker_other"] = batch - ms["tokenize"] - ms["forward"] - ms["postprocess"]
        ms["server"] = total
        ms["client_gap"] = client_ms[trace_id] - total
        ms["client"] = client_ms[trace_id]
        for k, v in ms.items():
            per_stage[k].append(v)
    out = {k: statistics.median(v) for k, v in per_stage.items()}
    out["traced_requests"] = len(by_trace)
    return out


# ---------------------------------------------------------------------------------------------- one start
def measure(client: BlockingClient, n: int, warmup: int) -> tuple[list[float], dict[str, float]]:
    """``n`` requests at concurrency 1 after ``warmup``; returns sorted client ms and ms by trace id."""
    for _ in range(warmup):
        status, _, _ = client.post("/predict", BODY, NO_CACHE)
        assert status == 200, status
    by_trace = {}
    for _ in range(n):
        trace_id = secrets.token_hex(16)
        headers = {**NO_CACHE, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        t0 = time.perf_counter()
        status, _, _ = client.post("/predict", BODY, headers)
        by_trace[trace_id] = (time.perf_counter() - t0) * 1000
        assert status == 200, status
    return sorted(by_trace.values()), by_trace


@contextlib.contextmanager
def busy_neighbour(enabled: bool):
    """A process spinning on one core for the duration of the block (when ``enabled``)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let the scheduler see it before the first measured request
        yield
    finally:
        proc.kill()
        proc.wait()


def one_start(name: str, overrides: list[str], env: dict, code_root: str | None, cache_dir: str, n: int,
              warmup: int, neighbour: bool = False, blocks: int = 1, gap_s: float = 0.0) -> dict:
    """Start ``name``'s server, measure ``n`` requests (``blocks`` times, ``gap_s`` idle seconds apart: the
    control that tells a start's own spread from the machine's drift over the same minutes), stop it."""
    out_dir = tempfile.mkdtemp(prefix=f"e2e-{name}-")
    server = ServerProcess([*overrides, "server.log_level=warning", "tracing=file",
                            f"hardware.compile_cache_dir={cache_dir}"], env=env or None, code_root=code_root,
                           startup_timeout=1800, output_dir=out_dir)
    t0 = time.perf_counter()
    try:
        server.start()
    except ServerFailedToStart as exc:
        # a config this machine cannot serve (e.g. a quality gate refusing it) is a result, not a crash
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("hydraserve:")),
                      next((line for line in reversed(lines) if "Error" in line), lines[0]))
        return {"config": name, "failed": reason}
    startup_s = time.perf_counter() - t0
    try:
        info = httpx.get(server.url + "/info", timeout=30).json()
        r = httpx.post(server.url + "/predict", json={"input": SENTENCES}, headers=NO_CACHE, timeout=60)
        r.raise_for_status()
        vectors = np.asarray(r.json()["embeddings"], dtype=np.float64)
        waited = wait_until_quiet(max_wait_s=10)
        load = os.getloadavg()[0]
        client = BlockingClient(server.url)
        block_p50s = []
        try:
            for block in range(blocks):
                if block:
                    time.sleep(gap_s)
                with busy_neighbour(neighbour):
                    samples, by_trace = measure(client, n, warmup)
                block_p50s.append(statistics.median(samples))
        finally:
            client.close()
        load_after = os.getloadavg()[0]
        time.sleep(1.2)  # the exporters flush every 500 ms: let the last spans reach the file
    finally:
        server.stop()
    stages = stage_breakdown(load_spans(Path(out_dir) / "traces.jsonl"), by_trace)
    engine = (info.get("engine") or [{}])[0] or {}
    return {"config": name, "startup_s": round(startup_s, 2), "load_before": round(load, 2),
            "load_after": round(load_after, 2), "quiet_wait_s": round(waited, 1),
            "p50_ms": statistics.median(samples), "block_p50s_ms": block_p50s,
            "p99_ms": samples[int(0.99 * (len(samples) - 1))],
            "stages_ms": stages, "vectors": vectors,
            "engine": {k: engine.get(k) for k in ("quality", "compile_mode", "runtime", "startup_ms", "compile_ms",
                                                  "onnx", "load_ms", "gate_ms", "warmup_ms")}}


# --------------------------------------------------------------------------------------------------- main
def cpu() -> str:
    """The CPU's name and the ISA features int8 speed depends on (VNNI / AMX, or AVX2 only)."""
    name, flags = "?", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "?":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    isa = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


NEIGHBOUR_NOTE = "; **beside a busy neighbour** (a process spinning on one core during the requests)"


def results_name(args: argparse.Namespace, *parts: str) -> str:
    """``NAME`` with the run's kind appended: a neighbour run never overwrites a quiet one's file."""
    return args.name + "".join(parts) + ("_neighbour" if args.neighbour else "") + ("_quick" if args.quick else "")


def same_start(variants: dict, blocks: int, n: int, args: argparse.Namespace, cache_root: str) -> int:
    """The control for the start-to-start spread: each config started once and measured ``blocks`` times,
    ``args.gap`` idle seconds apart (about what the other configs' starts take). A spread as wide as the
    one over starts says the machine drifts over those minutes; a narrow one puts it on the start."""
    rows, data = [], {}
    for name, v in variants.items():
        res = one_start(name, v.overrides, v.env, v.code_root, str(Path(cache_root) / name), n, args.warmup,
                        args.neighbour, blocks=blocks, gap_s=args.gap)
        if "failed" in res:
            print(f"{name}: FAILED TO START: {res['failed']}", flush=True)
            continue
        p50s = res["block_p50s_ms"]
        print(f"{name}: block p50s {[round(x, 2) for x in p50s]} ms", flush=True)
        data[name] = {"block_p50s_ms": p50s, "load_before": res["load_before"], "load_after": res["load_after"]}
        rows.append(f"| {name} | {' / '.join(f'{x:.2f}' for x in p50s)} | {max(p50s) / min(p50s):.2f}x | "
                    f"{res['load_before']}-{res['load_after']} |")
    lines = ["# One start, measured again and again (benchmarks/e2e_latency.py --same-start)", "",
             f"Command: `python benchmarks/e2e_latency.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}, {cpu()}; each config started once, {blocks} blocks of {n} requests "
             f"(after {args.warmup} warm-up ones each), {args.gap:.0f} s idle between blocks"
             + (NEIGHBOUR_NOTE if args.neighbour else "") + ".", "",
             "| config | p50 ms of each block | max/min | load avg |", "| --- | --- | ---: | --- |", *rows]
    path = write_results(results_name(args, "_same_start"), "\n".join(lines) + "\n", {"machine": machine(), **data})
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 100 requests")
    parser.add_argument("--rounds", type=int, default=5, help="starts per config")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per start")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--config", action="append", default=[],
                        help="NAME=override,override,... measured besides the default ones (repeatable)")
    parser.add_argument("--only", action="append", default=[], help="measure only these configs (by name)")
    parser.add_argument("--name", default="e2e_latency", help="results file name (benchmarks/results/NAME.md)")
    parser.add_argument("--neighbour", action="store_true",
                        help="measure beside a process that keeps one core busy (results NAME_neighbour)")
    parser.add_argument("--same-start", action="store_true",
                        help="the control: one start per config, measured --rounds times, --gap seconds apart")
    parser.add_argument("--gap", type=float, default=30.0, help="idle seconds between --same-start blocks")
    args = parser.parse_args()
    rounds, n = (2, 100) if args.quick else (args.rounds, args.requests)
    variants = {k: parse_variant(f"{k}={','.join(v)}") for k, v in DEFAULT_CONFIGS.items()}
    for text in args.config:
        v = parse_variant(text)
        variants[v.name] = v
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    cache_root = tempfile.mkdtemp(prefix="e2e-compile-cache-")
    starts: dict[str, list[dict]] = {k: [] for k in variants}
    failed: dict[str, str] = {}
    print(f"machine {machine()}, {cpu()}; load average at start {os.getloadavg()}", flush=True)
    if args.same_start:
        return same_start(variants, rounds, n, args, cache_root)
    for r in range(rounds):
        for name in [x for x in rotated(list(variants), r) if x in variants]:
            v = variants[name]
            res = one_start(name, v.overrides, v.env, v.code_root, str(Path(cache_root) / name), n, args.warmup,
                            args.neighbour)
            if "failed" in res:
                print(f"round {r + 1} {name}: FAILED TO START: {res['failed']}", flush=True)
                failed[name] = res["failed"]
                variants.pop(name)
                continue
            starts[name].append(res)
            st = res["stages_ms"]
            print(f"round {r + 1} {name}: start {res['startup_s']:.1f} s, p50 {res['p50_ms']:.2f} ms, "
                  f"p99 {res['p99_ms']:.2f} ms, forward {st.get('forward', float('nan')):.2f} ms, "
                  f"load {res['load_before']:.2f}->{res['load_after']:.2f}", flush=True)

    names = [k for k in starts if k not in failed]
    for k in failed:
        starts.pop(k)
    if not names:
        print("no config started:\n" + "\n".join(f"  {k}: {why}" for k, why in failed.items()))
        return 1
    base = "default" if "default" in starts else names[0]
    ref = starts[base][0]["vectors"]
    p50 = {k: statistics.median(s["p50_ms"] for s in v) for k, v in starts.items()}
    lines = ["# End to end, one server at a time (benchmarks/e2e_latency.py)", "",
             f"Command: `python benchmarks/e2e_latency.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}, {cpu()}; model=minilm on the CPU; one 12-token sentence per request, "
             f"`Cache-Control: no-cache`; concurrency 1; {rounds} rounds, each a fresh start of each config "
             f"(order rotating), {n} measured requests per start after {args.warmup} warm-up ones"
             + (NEIGHBOUR_NOTE if args.neighbour else "") + ".", "",
             "| config | overrides | p50 ms (median of starts) | p50 range over starts | max/min p50 | "
             "p99 ms (median) | speed-up vs " + base + " | cosine to " + base + " | first start s | "
             "later starts s | load avg during |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary: dict[str, Any] = {}
    for k in names:
        s = starts[k]
        p50s = [x["p50_ms"] for x in s]
        vec = s[0]["vectors"]
        cos = float(((vec * ref).sum(1) / (np.linalg.norm(vec, axis=1) * np.linalg.norm(ref, axis=1))).min())
        loads = [x["load_before"] for x in s] + [x["load_after"] for x in s]
        later = [x["startup_s"] for x in s[1:]]
        summary[k] = {"p50_ms": p50[k], "p50s": p50s, "p99_ms": statistics.median(x["p99_ms"] for x in s),
                      "speedup": p50[base] / p50[k], "cosine_min": cos, "first_start_s": s[0]["startup_s"],
                      "later_starts_s": later, "loads": loads}
        shown = [*(f"{key}={value}" for key, value in (variants[k].env or {}).items()), *variants[k].overrides]
        lines.append(f"| {k} | `{' '.join(shown) or '(shipped default)'}` | {p50[k]:.2f} | "
                     f"{_range(p50s)} | {max(p50s) / min(p50s):.2f}x | {summary[k]['p99_ms']:.2f} | "
                     f"{p50[base] / p50[k]:.2f}x | {cos:.4f} | {s[0]['startup_s']:.1f} | "
                     f"{_range(later) if later else '-'} | {_range(loads)} |")
    lines += ["", "Stage breakdown from the traces (ms, median over requests, then median over starts; "
              "api_other = decode + encode + hops to the worker, worker_other = batch span minus "
              "tokenize/forward/postprocess, client_gap = client time minus the server span):", "",
              "| config | client | server span | " + " | ".join(STAGES) + " |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " |"]
    for k in names:
        med = {st: statistics.median(x["stages_ms"].get(st, float("nan")) for x in starts[k])
               for st in (*STAGES, "client", "server")}
        summary[k]["stages_ms"] = med
        lines.append(f"| {k} | {med['client']:.2f} | {med['server']:.2f} | "
                     + " | ".join(f"{med[st]:.2f}" for st in STAGES) + " |")
    lines += ["", "Per start:", "", "| round | config | start s | p50 ms | p99 ms | forward ms | load before/after |",
              "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in range(rounds):
        for k in names:
            x = starts[k][r]
            lines.append(f"| {r + 1} | {k} | {x['startup_s']:.1f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                         f"{x['stages_ms'].get('forward', float('nan')):.2f} | {x['load_before']}/{x['load_after']} |")
    engines = {k: starts[k][-1]["engine"] for k in names}
    lines += [f"\n**{k} did not start**: {why}" for k, why in failed.items()]
    lines += ["", "Engine reports (`/info`, last start): " + "; ".join(f"{k}: {v}" for k, v in engines.items())]
    data = {"machine": machine(), "rounds": rounds, "requests": n, "summary": summary, "failed": failed,
            "starts": {k: [{kk: vv for kk, vv in x.items() if kk != "vectors"} for x in v] for k, v in starts.items()}}
    data["neighbour"] = args.neighbour
    path = write_results(results_name(args), "\n".join(lines) + "\n", data)
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
