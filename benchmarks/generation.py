"""Chat serving goals: ``hydraserve serve model=smollm2`` over HTTP against in-process transformers baselines.

    .venv/bin/python benchmarks/generation.py            # the full run (~6-8 minutes on 2 cores)
    .venv/bin/python benchmarks/generation.py --quick    # smoke run: 2 reps, 4 streams
    .venv/bin/python benchmarks/generation.py --save     # also writes benchmarks/results/generation.{md,json}

Every baseline in the same run, one thing on the CPU at a time:

1. In process, no server running (the SmolLM2 of ``load_smollm2``, torch's default thread count, as the
   server's worker uses): the bare transformers loop (``model(...)`` with its KV cache, greedy, one token at a
   time) on the first prompt, ``--reps`` times; sequential ``generate`` of every prompt (32 tokens, the
   correctness reference); one left-padded static ``generate`` batch of all prompts (``--new-tokens`` each,
   EOS suppressed like ``ignore_eos``); the engine in process with the shipped budgets (a diagnostic: the
   engine's own step time, without HTTP or the worker's IPC).
2. The server as shipped (``model=smollm2``: continuous batching, max_num_seqs 16, default cache and
   tracing), as the README starts it. Streaming chat through HTTP (httpx), greedy, ``ignore_eos``:
   concurrency 1 (``--reps`` requests of ``--new-tokens`` on the first prompt: TTFT from sending to the first
   content delta, ITL the gaps between content deltas), then all prompts concurrently (total output tokens/s,
   ITL p99, outputs for the agreement check, the worker's peak RSS from /proc/<pid>/status VmHWM, the pid
   from ``GET /info`` -> ``engine[0].pid``). The server is stopped before anything else runs.
3. The same server with ``batching.max_num_seqs=1``, the same concurrent streams.
4. The bare loop again, after the servers (the baseline is the p50 over both sessions: load drift shows).

Goals (issue): server TTFT p50 and ITL p50 at concurrency 1 each <= 1.15x the bare loop's; at 16 streams
tokens/s >= 6x max_num_seqs=1 and >= the static batch, ITL p99 <= 3x its concurrency-1 value; greedy
output (first 32 tokens, compared as text against sequential generate) equal for >= 15 of 16 prompts.
The default ``cache=disk`` is kept, but every request sends ``Cache-Control: no-cache``: the cache answers
deterministic requests (greedy ones included, streamed as a replay), and a hit is not generation.
The load average is recorded at the start and around each phase: other work on the machine
shares its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generation_engine import QUESTIONS, bare_loop, sequential_generate  # noqa: E402
from framework.generation import EngineConfig, GenerationEngine, GenerationRequest  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402
from plugins.model._causal_lm import chat_prompt_ids, load_smollm2  # noqa: E402
from plugins.model._llama_batched import LlamaBatchedForward  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SERVED_NAME = "SmolLM2-135M-Instruct"
SHIPPED = ["model=smollm2"]  # the README's command; ServerProcess adds server.port and hydra.run.dir
# max_num_seqs=1 serves the streams one after another: the last one waits ~a minute for its first token, past
# the shipped 30 s server.timeout_ms (which bounds the wait for a first token), so this baseline raises it.
SERIAL = [*SHIPPED, "batching.max_num_seqs=1", "server.timeout_ms=900000"]
CHECK_TOKENS = 32  # greedy agreement over the first 32 tokens
# The shipped batching=continuous budgets (conf/batching/continuous.yaml), for the in-process engine diagnostic.
SHIPPED_ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=1024, max_waiting=64)
GOALS = {"ttft_ratio": 1.15, "itl_ratio": 1.15, "speedup_vs_serial": 6.0, "speedup_vs_static": 1.0,
         "itl_p99_ratio": 3.0, "agreement": 15}


# ------------------------------------------------------------------------------------------- stats
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def latency_summary(runs: list[list[float]]) -> dict:
    """Token (or chunk) times since the request, one list per request -> TTFT/ITL stats in ms."""
    ttfts = [t[0] * 1e3 for t in runs]
    itls = [g * 1e3 for t in runs for g in gaps(t)]
    return {"ttft_p50": statistics.median(ttfts), "ttft_min": min(ttfts), "ttft_max": max(ttfts),
            "itl_p50": statistics.median(itls), "itl_p90": pct(itls, 90), "itl_p99": pct(itls, 99),
            "itl_mean": statistics.fmean(itls), "requests": len(runs), "gaps": len(itls)}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------ in process
def static_batch_ignore_eos(model, prompts: list[list[int]], n: int, pad: int) -> tuple[float, int]:
    """One left-padded ``generate`` batch, ``n`` tokens per row (EOS suppressed, as the server's
    ``ignore_eos``: the same work as the streams). Returns (seconds, output tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=pad)
    elapsed = time.perf_counter() - t0
    return elapsed, int(out[:, width:].numel())


def engine_in_process(model, tokenizer, prompts: list[list[int]], n: int) -> tuple[float, list[list[float]]]:
    """The engine with the shipped budgets, no server: all prompts queued at t=0, ``ignore_eos``.
    Returns (seconds, token times since t=0 per sequence)."""
    cfg = SHIPPED_ENGINE
    engine = GenerationEngine(LlamaBatchedForward(model, cfg.max_num_seqs, cfg.max_model_len), tokenizer, cfg)
    t0 = time.perf_counter()
    ids = [engine.add(GenerationRequest(prompt_ids=p, max_tokens=n, ignore_eos=True)) for p in prompts]
    times: dict[int, list[float]] = {i: [] for i in ids}
    while engine.has_work():
        step = engine.step()
        now = time.perf_counter() - t0
        for o in step:
            times[o.seq_id].extend([now] * len(o.new_token_ids))
    return time.perf_counter() - t0, [times[i] for i in ids]


def bare_session(model, prompt: list[int], n: int, reps: int) -> list[list[float]]:
    bare_loop(model, prompt, 4)  # warm-up
    return [bare_loop(model, prompt, n) for _ in range(reps)]


# --------------------------------------------------------------------------------------- client
async def stream_chat(client: httpx.AsyncClient, question: str, n: int) -> dict:
    """One streamed greedy chat request; content-delta arrival times since sending, the text, usage."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0, "max_tokens": n, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, pieces, tokens = [], [], None
    # no-cache: the shipped config caches deterministic answers (cache=disk), and a replayed hit is
    # not generation; every server here must compute every answer.
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Cache-Control": "no-cache"}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("error"):
                raise RuntimeError(f"stream error: {obj['error']}")
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    times.append(time.perf_counter() - t0)
                    pieces.append(content)
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"times": times, "text": "".join(pieces), "tokens": tokens if tokens is not None else len(times),
            "start": t0, "end": end}


async def sequential_streams(url: str, question: str, n: int, reps: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await stream_chat(client, question, n) for _ in range(reps)]


async def concurrent_streams(url: str, questions: list[str], n: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=len(questions) + 4)) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(stream_chat(client, q, n) for q in questions))
        return list(out), time.perf_counter() - t0


def proc_status(pid: int) -> dict:
    """VmHWM / VmRSS of a process in MiB (Linux)."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


_METRIC = re.compile(r"^(hydraserve_(?:inter_token_latency|time_to_first_token)_seconds_(?:sum|count))(?:\{[^}]*\})?"
                     r"\s+([0-9.eE+-]+)$")


def server_metrics(url: str) -> dict[str, float]:
    """The API processes' own TTFT/ITL histogram sums and counts from /metrics (summed over labels)."""
    out: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            m = _METRIC.match(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def metrics_mean_ms(before: dict, after: dict, name: str) -> float | None:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return total / count * 1e3 if count else None


def agreement(texts: list[str], expected: list[str]) -> tuple[int, list[int]]:
    """How many server texts start with sequential generate's first-32-token text (decoded)."""
    bad = [i for i, (t, e) in enumerate(zip(texts, expected, strict=True)) if not t.startswith(e)]
    return len(texts) - len(bad), bad


def run_server(name: str, overrides: list[str], questions: list[str], n: int, reps: int, with_c1: bool) -> dict:
    res: dict = {"overrides": overrides, "load_avg_before": load_avg()}
    out_dir = tempfile.mkdtemp(prefix=f"hydraserve-generation-{name}-")
    server = ServerProcess(overrides, output_dir=out_dir)
    t0 = time.perf_counter()
    server.start()
    try:
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        res["command"] = " ".join(["hydraserve serve", *overrides, f"server.port={server.port}"])
        info = httpx.get(server.url + "/info", timeout=10).json()
        engine = info["engine"][0]
        pid = engine["pid"]
        res["worker"] = {k: engine.get(k) for k in ("pid", "device", "max_num_seqs", "max_num_batched_tokens",
                                                     "max_model_len", "threads", "torch_threads") if k in engine}
        res["worker_rss_after_start_mib"] = proc_status(pid)
        # Warm-up: one stream, then every stream at once (short), outside the timings.
        asyncio.run(sequential_streams(server.url, questions[0], 8, 1))
        asyncio.run(concurrent_streams(server.url, questions, 4))
        if with_c1:
            before = server_metrics(server.url)
            c1 = asyncio.run(sequential_streams(server.url, questions[0], n, reps))
            after = server_metrics(server.url)
            res["c1"] = latency_summary([r["times"] for r in c1])
            res["c1"]["tokens_per_request"] = [r["tokens"] for r in c1]
            res["c1"]["chunks_per_request"] = [len(r["times"]) for r in c1]
            res["c1"]["server_side_mean_ms"] = {
                "ttft": metrics_mean_ms(before, after, "hydraserve_time_to_first_token_seconds"),
                "itl": metrics_mean_ms(before, after, "hydraserve_inter_token_latency_seconds")}
        res["load_avg_before_streams"] = load_avg()
        streams, wall = asyncio.run(concurrent_streams(server.url, questions, n))
        tokens = sum(r["tokens"] for r in streams)
        res["streams"] = {"n": len(streams), "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
                          **latency_summary([r["times"] for r in streams])}
        res["texts"] = [r["text"] for r in streams]
        res["worker_rss_mib"] = proc_status(pid)
        res["api_process_rss_mib"] = proc_status(info["api_process"]["pid"])
    finally:
        server.stop()
    res["load_avg_after"] = load_avg()
    return res


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 reps, 4 streams")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/generation.{md,json}")
    ap.add_argument("--reps", type=int, default=None, help="concurrency-1 requests (default 5, --quick 2)")
    ap.add_argument("--streams", type=int, default=None, help="concurrent streams (default 16, --quick 4)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--from-json", help="render (and with --save write) the results of an earlier run's JSON")
    args = ap.parse_args()
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C, so run_server's finally stops the server it started:
    # ServerProcess runs it in a session of its own, which would otherwise outlive this process.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.from_json:
        return finish(json.loads(Path(args.from_json).read_text()), args)
    reps = args.reps or (2 if args.quick else 5)
    nstreams = args.streams or (4 if args.quick else 16)
    n = args.new_tokens
    questions = QUESTIONS[:nstreams]
    started = datetime.now(timezone.utc)
    res: dict = {"command": " ".join([".venv/bin/python benchmarks/generation.py", *sys.argv[1:]]),
                 "date": started.isoformat(timespec="seconds"), "quick": args.quick, "reps": reps,
                 "streams": nstreams, "new_tokens": n, "load_avg_start": load_avg()}
    res["machine"] = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(f"load average at start: {res['load_avg_start']} on {os.cpu_count()} cores", flush=True)

    t_load = time.perf_counter()
    tokenizer, model = load_smollm2()
    res["model_load_s"] = round(time.perf_counter() - t_load, 1)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]

    def phase(msg: str) -> None:
        print(f"[{time.perf_counter() - t_run:6.1f} s] {msg} (load {load_avg()})", flush=True)

    t_run = time.perf_counter()
    with torch.inference_mode():
        phase("in process: bare loop (before the servers)")
        bare_before = bare_session(model, prompts[0], n, reps)
        phase("in process: sequential generate (32 tokens, the correctness reference)")
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        seq, seq_s = sequential_generate(model, prompts, min(CHECK_TOKENS, n), eos)
        expected = [tokenizer.decode(o, skip_special_tokens=True).rstrip("\ufffd") for o in seq]
        phase("in process: static left-padded generate batch")
        static_s, static_tokens = static_batch_ignore_eos(model, prompts, n, pad)
        phase("in process: engine with the shipped budgets (diagnostic)")
        engine_in_process(model, tokenizer, prompts[:2], 4)  # warm-up
        eng_c1 = [engine_in_process(model, tokenizer, prompts[:1], n)[1][0] for _ in range(2)]
        eng_all_s, _ = engine_in_process(model, tokenizer, prompts, n)
    res["in_process"] = {
        "sequential_generate_32": {"seconds": seq_s, "output_tokens": sum(map(len, seq)),
                                   "tokens_per_s": sum(map(len, seq)) / seq_s},
        "static_batch": {"seconds": static_s, "output_tokens": static_tokens, "tokens_per_s": static_tokens / static_s},
        "engine_c1": latency_summary(eng_c1),
        "engine_all": {"seconds": eng_all_s, "tokens_per_s": len(prompts) * n / eng_all_s},
    }

    phase(f"server as shipped: {' '.join(SHIPPED)}")
    shipped = run_server("shipped", SHIPPED, questions, n, reps, with_c1=True)
    phase(f"server serial: {' '.join(SERIAL)}")
    serial = run_server("serial", SERIAL, questions, n, reps, with_c1=False)
    phase("in process: bare loop (after the servers)")
    with torch.inference_mode():
        bare_after = bare_session(model, prompts[0], n, reps)
    phase("done")
    res["load_avg_end"] = load_avg()
    res["wall_s"] = round(time.perf_counter() - t_run, 1)

    bare = latency_summary(bare_before + bare_after)
    res["bare_loop"] = {"both": bare, "before": latency_summary(bare_before), "after": latency_summary(bare_after)}
    agree_shipped, bad_shipped = agreement(shipped.pop("texts"), expected)
    agree_serial, bad_serial = agreement(serial.pop("texts"), expected)
    res["servers"] = {"shipped": shipped, "serial": serial}
    c1, s16, s1 = shipped["c1"], shipped["streams"], serial["streams"]
    ratios = {"ttft_ratio": c1["ttft_p50"] / bare["ttft_p50"], "itl_ratio": c1["itl_p50"] / bare["itl_p50"],
              "speedup_vs_serial": s16["tokens_per_s"] / s1["tokens_per_s"],
              "speedup_vs_static": s16["tokens_per_s"] / res["in_process"]["static_batch"]["tokens_per_s"],
              "itl_p99_ratio": s16["itl_p99"] / c1["itl_p99"], "agreement": agree_shipped}
    res["ratios"] = ratios
    res["agreement"] = {"shipped": agree_shipped, "shipped_mismatches": bad_shipped, "serial": agree_serial,
                        "serial_mismatches": bad_serial, "of": len(prompts)}
    targets = {**GOALS, "agreement": len(prompts) - 1}  # 15 of 16
    res["goals"] = {k: (v >= targets[k] if k.startswith(("speedup", "agreement")) else v <= targets[k])
                    for k, v in ratios.items()}
    res["worker_peak_rss_mib"] = shipped["worker_rss_mib"].get("VmHWM")
    raw = Path(tempfile.gettempdir()) / "hydraserve-generation-last.json"
    raw.write_text(json.dumps(res, indent=2) + "\n")  # kept even when rendering fails: --from-json
    print(f"raw results: {raw}")
    finish(res, args)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def finish(res: dict, args: argparse.Namespace) -> None:
    md = render(res, args)
    print("\n".join(md))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generation.json").write_text(json.dumps(res, indent=2) + "\n")
        (RESULTS / "generation.md").write_text("\n".join(md) + "\n")
        print(f"wrote {RESULTS / 'generation.md'} and .json")


def render(res: dict, args: argparse.Namespace) -> list[str]:
    ip, bare, sh, se = res["in_process"], res["bare_loop"], res["servers"]["shipped"], res["servers"]["serial"]
    c1, s16, s1, r, g = sh["c1"], sh["streams"], se["streams"], res["ratios"], res["goals"]
    ns, m = res["streams"], res["machine"]

    def mark(key: str) -> str:
        return "**met**" if g[key] else "**missed**"

    cmd = f"`{res['command']}`"
    return [
        "# Chat serving goals: `hydraserve serve model=smollm2` over HTTP vs in-process transformers (CPU)", "",
        f"{cmd}, {res['date']}; {m['nproc']} cores ({m['platform']}), torch {m['torch']}, "
        f"{m['torch_threads']} torch threads in process and torch's default in the worker; SmolLM2-135M-Instruct "
        f"fp32 from the packaged GGUF, greedy, chat-templated, {res['new_tokens']} tokens per request "
        f"(`ignore_eos`), {ns} prompts/streams, {res['reps']} concurrency-1 repetitions; run took {res['wall_s']} s.",
        "",
        f"Load average (1, 5, 15 min) at the start: {res['load_avg_start']}; before the shipped server's streams "
        f"{sh['load_avg_before_streams']}; at the end {res['load_avg_end']} (this run's own processes count too; "
        "other work shares the machine, so anything above ~1 at the start means a core was taken by someone "
        "else for part of the run).", "",
        f"Servers: `{sh['command']}` (as shipped: continuous batching, default cache and tracing; every "
        "request sends `Cache-Control: no-cache`, so none is answered from the cache) and the same with "
        "`batching.max_num_seqs=1`. "
        "One server at a time; the bare loop runs before and after them, with no server alive. The "
        "max_num_seqs=1 server also gets `server.timeout_ms=900000`: it answers the streams one after another, "
        "and the last waits longer than the shipped 30 s deadline for its first token.", "",
        "| goal | measured | baseline | ratio | target | |", "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| 1. TTFT p50, concurrency 1 (ms) | {c1['ttft_p50']:.1f} | bare loop {bare['both']['ttft_p50']:.1f} | "
        f"{r['ttft_ratio']:.2f}x | <= 1.15x | {mark('ttft_ratio')} |",
        f"| 1. ITL p50, concurrency 1 (ms) | {c1['itl_p50']:.1f} | bare loop {bare['both']['itl_p50']:.1f} | "
        f"{r['itl_ratio']:.2f}x | <= 1.15x | {mark('itl_ratio')} |",
        f"| 2. tokens/s, {ns} streams vs max_num_seqs=1 | {s16['tokens_per_s']:.1f} | {s1['tokens_per_s']:.1f} | "
        f"{r['speedup_vs_serial']:.2f}x | >= 6x | {mark('speedup_vs_serial')} |",
        f"| 2. tokens/s, {ns} streams vs static generate batch | {s16['tokens_per_s']:.1f} | "
        f"{ip['static_batch']['tokens_per_s']:.1f} | {r['speedup_vs_static']:.2f}x | >= 1x | "
        f"{mark('speedup_vs_static')} |",
        f"| 2. ITL p99, {ns} streams vs concurrency 1 (ms) | {s16['itl_p99']:.1f} | {c1['itl_p99']:.1f} | "
        f"{r['itl_p99_ratio']:.2f}x | <= 3x | {mark('itl_p99_ratio')} |",
        f"| 3. greedy agreement, first {min(CHECK_TOKENS, res['new_tokens'])} tokens | "
        f"{res['agreement']['shipped']}/{res['agreement']['of']} | "
        f"sequential generate | | >= {res['agreement']['of'] - 1}/{res['agreement']['of']} | {mark('agreement')} |",
        f"| 4. worker peak RSS at {ns} streams (VmHWM, MiB) | {res['worker_peak_rss_mib']} | | | report | |", "",
        "Latency detail (ms; ITL = gaps between content deltas as the client received them):", "",
        "| | TTFT p50 | TTFT min..max | ITL p50 | ITL p90 | ITL p99 | ITL mean | gaps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {s['ttft_p50']:.1f} | {s['ttft_min']:.1f}..{s['ttft_max']:.1f} | {s['itl_p50']:.1f} | "
          f"{s['itl_p90']:.1f} | {s['itl_p99']:.1f} | {s['itl_mean']:.1f} | {s['gaps']} |"
          for name, s in (("bare loop, before the servers", bare["before"]), ("bare loop, after", bare["after"]),
                          ("engine in process, shipped budgets (diagnostic)", ip["engine_c1"]),
                          ("server, concurrency 1", c1), (f"server, {ns} streams", s16),
                          (f"server max_num_seqs=1, {ns} streams", s1))), "",
        f"Server-side means at concurrency 1 (the API process's /metrics histograms): TTFT "
        f"{_fmt(c1['server_side_mean_ms']['ttft'])} ms, ITL {_fmt(c1['server_side_mean_ms']['itl'])} ms "
        f"(client-side ITL mean {c1['itl_mean']:.1f} ms). Content chunks per {res['new_tokens']}-token request: "
        f"{c1['chunks_per_request']} (usage tokens {c1['tokens_per_request']}).", "",
        "| throughput | output tokens | seconds | tokens/s |", "| --- | ---: | ---: | ---: |",
        f"| server as shipped, {ns} streams | {s16['output_tokens']} | "
        f"{s16['wall_s']:.1f} | {s16['tokens_per_s']:.1f} |",
        f"| server max_num_seqs=1, {ns} streams | {s1['output_tokens']} | "
        f"{s1['wall_s']:.1f} | {s1['tokens_per_s']:.1f} |",
        f"| static left-padded generate batch (in process) | {ip['static_batch']['output_tokens']} | "
        f"{ip['static_batch']['seconds']:.1f} | {ip['static_batch']['tokens_per_s']:.1f} |",
        f"| engine in process, shipped budgets, all prompts (diagnostic) | {ns * res['new_tokens']} | "
        f"{ip['engine_all']['seconds']:.1f} | {ip['engine_all']['tokens_per_s']:.1f} |",
        f"| sequential generate, 32 tokens to EOS (correctness reference) | "
        f"{ip['sequential_generate_32']['output_tokens']} | {ip['sequential_generate_32']['seconds']:.1f} | "
        f"{ip['sequential_generate_32']['tokens_per_s']:.1f} |", "",
        f"Greedy agreement (server text starts with sequential generate's first {min(CHECK_TOKENS, res['new_tokens'])} "
        f"tokens decoded): shipped "
        f"{res['agreement']['shipped']}/{res['agreement']['of']} (mismatches {res['agreement']['shipped_mismatches']}),"
        f" max_num_seqs=1 {res['agreement']['serial']}/{res['agreement']['of']} "
        f"(mismatches {res['agreement']['serial_mismatches']}).", "",
        f"Memory (MiB): worker after start {sh['worker_rss_after_start_mib']}, after the {ns} streams "
        f"{sh['worker_rss_mib']}; max_num_seqs=1 worker after its streams {se['worker_rss_mib']}; API process "
        f"{sh['api_process_rss_mib']}. Server start-up: {sh['startup_s']} s (shipped), {se['startup_s']} s "
        f"(max_num_seqs=1).",
    ]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
