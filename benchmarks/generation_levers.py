"""Each generation latency lever against the same server without it, with its quality beside it (issue 18).

    .venv/bin/python benchmarks/generation_levers.py            # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/generation_levers.py --quick    # smoke run: 2 reps, fewer streams
    .venv/bin/python benchmarks/generation_levers.py --save     # also writes results/generation_levers.{md,json}
    .venv/bin/python benchmarks/generation_levers.py --levers prefix_cache,speculative --rounds 2

One ``hydraserve serve model=smollm2`` at a time (the README's config; each lever is one override), streamed
greedy chat through HTTP, ``Cache-Control: no-cache`` so the response cache never answers:

* ``prefix_cache`` (on as shipped) against ``batching.prefix_cache_mb=0``: a ~430-token system prompt (a
  museum's text, benchmarks/data/lighthouse.txt) with a different question each time, after one request
  that put the system prompt in the cache. TTFT p50; quality: the answers are identical.
* ``speculative`` (``batching.speculative=ngram``) against the shipped server: an input-grounded task, "copy
  the Nth paragraph of the text above". Time per output token at concurrency 1 (the mean inter-token
  latency: (last token - first token) / (tokens - 1), since speculation sends tokens in bursts), then output
  tokens/s with 4 and 16 concurrent streams (how the gain changes with load; it pauses above
  ``speculative_max_batch``). Quality: the answers are identical.
* ``int8_weight_only`` and ``bf16`` (``quantization=...``) against the shipped fp32: time per output token at
  concurrency 1 and tokens/s over 16 streams on the 16 chat questions (64 tokens, ``ignore_eos``). Quality:
  the start-up gate's token agreement and perplexity ratio against fp32 (from ``/info``).
* ``compile`` (``hardware.compile=default``, only with ``--with-compile``: minutes of start-up here).

Ratios are baseline / lever (above 1: the lever is faster). With ``--rounds 2`` the servers run twice,
alternating, and each ratio is reported as the range over rounds. The load average is recorded beside each
server: other work on the machine shares its two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generation_engine import QUESTIONS  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SERVED_NAME = "SmolLM2-135M-Instruct"
BASE = ["model=smollm2"]
PASSAGE = (ROOT / "benchmarks" / "data" / "lighthouse.txt").read_text().strip()
PREFIX_QUESTIONS = ["When was the lighthouse built?", "Who was the last keeper?", "How many steps are there?",
                    "What did the lamp burn?", "When does the museum open?", "How much is a ticket?",
                    "How often does the beam sweep?", "What happened in the winter of 1947?"]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]
# lever -> (overrides of the server with it, overrides of the server without it, workloads). Speculation
# also runs the chat questions: what it costs when the answer does not quote the prompt.
LEVERS = {
    "prefix_cache": ([], ["batching.prefix_cache_mb=0"], ["shared_prefix"]),
    "speculative": (["batching.speculative=ngram"], [], ["quote", "chat"]),
    "int8_weight_only": (["quantization=int8_weight_only"], [], ["chat"]),
    "bf16": (["quantization=bf16"], [], ["chat"]),
    "compile": (["hardware.compile=default"], [], ["chat"]),
}
GOALS = {"prefix_cache": ("ttft", 3.0), "speculative": ("tpot_c1", 1.5)}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------- client
async def stream(client: httpx.AsyncClient, messages: list[dict], n: int, ignore_eos: bool) -> dict:
    body = {"model": SERVED_NAME, "messages": messages, "stream": True, "temperature": 0, "max_tokens": n,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, pieces, tokens = [], [], None
    async with client.stream("POST", "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            if obj.get("error"):
                raise RuntimeError(f"stream error: {obj['error']}")
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.perf_counter() - t0)
                    pieces.append(choice["delta"]["content"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    tokens = tokens if tokens is not None else len(times)
    tpot = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and times else None
    return {"ttft": times[0] if times else None, "tpot": tpot, "tokens": tokens, "text": "".join(pieces)}


async def one_by_one(url: str, requests: list[tuple[list[dict], int, bool]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        return [await stream(client, *req) for req in requests]


async def together(url: str, requests: list[tuple[list[dict], int, bool]]) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=900,
                                 limits=httpx.Limits(max_connections=len(requests) + 4)) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(stream(client, *req) for req in requests))
        return list(out), time.perf_counter() - t0


def metric_totals(url: str, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


# ------------------------------------------------------------------------------------- workloads
def shared_prefix(url: str, reps: int) -> dict:
    def ask(q: str) -> tuple[list[dict], int, bool]:
        return [{"role": "system", "content": PASSAGE}, {"role": "user", "content": q}], 16, False

    asyncio.run(one_by_one(url, [ask("What is this text about?")]))  # the system prompt now cached (if on)
    before = metric_totals(url, "hydraserve_prefix_cache")
    runs = asyncio.run(one_by_one(url, [ask(PREFIX_QUESTIONS[i % len(PREFIX_QUESTIONS)]) for i in range(reps)]))
    after = metric_totals(url, "hydraserve_prefix_cache")
    hits = after.get("hydraserve_prefix_cache_hits_total", 0) - before.get("hydraserve_prefix_cache_hits_total", 0)
    return {"ttft_ms": [round(r["ttft"] * 1e3, 1) for r in runs], "ttft": statistics.median(r["ttft"] for r in runs),
            "hit_tokens_per_request": hits / len(runs), "texts": [r["text"] for r in runs]}


def quote(url: str, reps: int, streams: list[int]) -> dict:
    def ask(i: int) -> tuple[list[dict], int, bool]:
        text = f"{PASSAGE}\n\nCopy the {ORDINALS[i % len(ORDINALS)]} paragraph of the text above, word for word."
        return [{"role": "user", "content": text}], 96, False

    asyncio.run(one_by_one(url, [ask(0)]))  # warm-up (and the passage into the prefix cache)
    before = metric_totals(url, "hydraserve_spec_decode")
    c1 = asyncio.run(one_by_one(url, [ask(i) for i in range(reps)]))
    after = metric_totals(url, "hydraserve_spec_decode")
    drafted = after.get("hydraserve_spec_decode_num_draft_tokens_total", 0) - before.get(
        "hydraserve_spec_decode_num_draft_tokens_total", 0)
    accepted = after.get("hydraserve_spec_decode_num_accepted_tokens_total", 0) - before.get(
        "hydraserve_spec_decode_num_accepted_tokens_total", 0)
    out = {"tpot_ms": [round(r["tpot"] * 1e3, 1) for r in c1], "tpot_c1": statistics.median(r["tpot"] for r in c1),
           "ttft": statistics.median(r["ttft"] for r in c1), "tokens": [r["tokens"] for r in c1],
           "texts": [r["text"] for r in c1], "acceptance": accepted / drafted if drafted else None}
    for n in streams:
        runs, wall = asyncio.run(together(url, [ask(i) for i in range(n)]))
        out[f"tokens_per_s_{n}"] = sum(r["tokens"] for r in runs) / wall
    return out


def chat(url: str, reps: int, streams: list[int]) -> dict:
    def ask(i: int) -> tuple[list[dict], int, bool]:
        return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], 64, True

    asyncio.run(one_by_one(url, [ask(0)]))
    c1 = asyncio.run(one_by_one(url, [ask(0)] * reps))
    out = {"tpot_ms": [round(r["tpot"] * 1e3, 1) for r in c1], "tpot_c1": statistics.median(r["tpot"] for r in c1),
           "ttft": statistics.median(r["ttft"] for r in c1), "texts": [r["text"] for r in c1]}
    for n in streams:
        runs, wall = asyncio.run(together(url, [ask(i) for i in range(n)]))
        out[f"tokens_per_s_{n}"] = sum(r["tokens"] for r in runs) / wall
    return out


def run_server(overrides: list[str], workloads: list[str], reps: int, streams: list[int]) -> dict:
    res: dict = {"overrides": overrides, "load_avg_before": load_avg()}
    server = ServerProcess(overrides, output_dir=tempfile.mkdtemp(prefix="hydraserve-levers-"), startup_timeout=900)
    t0 = time.perf_counter()
    try:  # start() inside: an interrupt while it waits for readiness must stop the server too
        server.start()
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        engine = httpx.get(server.url + "/info", timeout=10).json()["engine"][0]
        res["gate"] = {k: engine[k] for k in ("quality", "perplexity_ratio", "quality_gate") if k in engine}
        for w in workloads:
            res[w] = {"shared_prefix": lambda: shared_prefix(server.url, reps),
                      "quote": lambda: quote(server.url, reps, streams),
                      "chat": lambda: chat(server.url, reps, streams[-1:])}[w]()
    finally:
        server.stop()
    res["load_avg_after"] = load_avg()
    return res


# ------------------------------------------------------------------------------------------ main
def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--levers", default="prefix_cache,speculative,int8_weight_only",
                    help=f"comma-separated, from {', '.join(LEVERS)} (bf16 needs a CPU with native bf16)")
    ap.add_argument("--with-compile", action="store_true", help="also hardware.compile=default (slow start-up)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    levers = [x for x in args.levers.split(",") if x] + (["compile"] if args.with_compile else [])
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        sys.exit(f"--levers: unknown {unknown}; choose from {', '.join(LEVERS)}")
    reps = 2 if args.quick else 5
    streams = [4, 16] if not args.quick else [4]
    res: dict = {"command": " ".join([".venv/bin/python benchmarks/generation_levers.py", *sys.argv[1:]]),
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reps": reps,
                 "streams": streams, "nproc": os.cpu_count(), "load_avg_start": load_avg(), "rounds": []}
    base_workloads = sorted({w for x in levers for w in LEVERS[x][2]})  # the shipped server: every lever's other side
    for r in range(args.rounds):
        rnd: dict = {}
        print(f"round {r + 1}: the shipped server ({' '.join(BASE)}) on {base_workloads} (load {load_avg()})",
              flush=True)
        rnd["base"] = run_server(BASE, base_workloads, reps, streams)
        for lever in levers:
            with_, without, workloads = LEVERS[lever]
            print(f"round {r + 1}: {lever} (load {load_avg()})", flush=True)
            rnd[lever] = run_server(BASE + (with_ or without), workloads, reps, streams)
        res["rounds"].append(rnd)
    res["load_avg_end"] = load_avg()
    res["summary"] = summarize(res, levers)
    md = render(res, levers)
    print(md)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generation_levers.json").write_text(json.dumps(res, indent=1))
        (RESULTS / "generation_levers.md").write_text(md)


def summarize(res: dict, levers: list[str]) -> dict:
    """``"lever/workload"`` -> one row per round: each measure with, without and the ratio."""
    return {f"{lever}/{workload}": [_compare(rnd, lever, workload) for rnd in res["rounds"]]
            for lever in levers for workload in LEVERS[lever][2]}


def _compare(rnd: dict, lever: str, workload: str) -> dict:
    # The shipped server is the one *without* the lever, except for the prefix cache (on as shipped).
    on, off = (rnd[lever], rnd["base"]) if LEVERS[lever][0] else (rnd["base"], rnd[lever])
    a, b = on[workload], off[workload]
    same = sum(x == y for x, y in zip(a["texts"], b["texts"], strict=True)) if "texts" in a else None
    row = {"workload": workload, "same_output": same, "answers": len(a.get("texts", ())),
           "gate": on.get("gate"), "load": [on["load_avg_before"], off["load_avg_before"]],
           "startup_s": [on["startup_s"], off["startup_s"]]}
    for key in ("ttft", "tpot_c1", *[k for k in a if k.startswith("tokens_per_s_")]):
        if a.get(key) and b.get(key):
            higher_better = key.startswith("tokens_per_s_")
            row[key] = {"on": a[key], "off": b[key], "ratio": a[key] / b[key] if higher_better else b[key] / a[key]}
    for key in ("acceptance", "hit_tokens_per_request"):
        if a.get(key) is not None:
            row[key] = a[key]
    return row


def _fmt(v: float, key: str) -> str:
    return f"{v:.1f}" if key.startswith("tokens_per_s") else f"{v * 1e3:.1f} ms"


def render(res: dict, levers: list[str]) -> str:
    lines = ["# Generation levers: each against the same server without it", "",
             f"`{res['command']}` on {res['date']}, {res['nproc']} cores, load average at start "
             f"{res['load_avg_start']}, {len(res['rounds'])} round(s), {res['reps']} requests at concurrency 1.",
             "Ratios: without / with (above 1 = the lever is faster); with several rounds, the range.", "",
             "| lever | measure | with | without | ratio | quality |", "|---|---|---:|---:|---:|---|"]
    for name, rows in res["summary"].items():
        lever = name.split("/")[0]
        keys = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ratio" in rows[0][k]]
        for key in keys:
            ratios = [r[key]["ratio"] for r in rows if key in r]
            ratio = f"{min(ratios):.2f}x" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}x"
            quality = _quality(rows[0], lever)
            on, off = _fmt(rows[0][key]["on"], key), _fmt(rows[0][key]["off"], key)
            lines.append(f"| {lever} | {rows[0]['workload']}: {key} | {on} | {off} | "
                         f"{ratio} | {quality} |")
    lines += ["", "Goals (issue 18): prefix cache TTFT >= 3x with a 400-token shared prefix; speculation (ngram) "
              "time per token >= 1.5x at concurrency 1 on an input-grounded task; greedy output unchanged by both.",
              "Load average before each server (with, without) per round:"]
    for name, rows in res["summary"].items():
        lines.append(f"- {name}: " + "; ".join(str(r["load"]) for r in rows))
    return "\n".join(lines) + "\n"


def _quality(row: dict, lever: str) -> str:
    gate = row.get("gate") or {}
    quality = gate.get("quality") or {}
    if quality:
        return (f"token agreement {quality.get('token_agreement')}, perplexity ratio "
                f"{gate.get('perplexity_ratio')} (gate {gate.get('quality_gate')})")
    if row.get("same_output") is not None:
        q = f"{row['same_output']}/{row['answers']} answers identical"
        if "acceptance" in row:
            q += f", {row['acceptance']:.0%} of drafted tokens accepted"
        if "hit_tokens_per_request" in row:
            q += f", {row['hit_tokens_per_request']:.0f} prompt tokens from the cache per request"
        return q
    return "-"


if __name__ == "__main__":
    main()
