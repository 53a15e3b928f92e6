"""Compiled decode step vs the eager one (issue 18, item 1), SmolLM2-135M-Instruct fp32, greedy, CPU.

    .venv/bin/python benchmarks/compiled_decode.py [--quick] [--save] [--new-tokens 48] [--threads 0]

Both forwards (``LlamaBatchedForward`` with ``compile_mode="off"`` and ``"default"``) run on the same
loaded weights in one process; every measurement alternates eager and compiled so that load from other
work on the machine hits both alike. Reported: the compiled warm-up (every batch bucket compiled),
batch-1/4/16 inter-token latency (p50 of decode-only engine steps), output tokens/s of 16 concurrent
streams (prefill included), and greedy agreement (first 32 tokens of each prompt, compiled vs eager).
``--save`` writes benchmarks/results/compiled_decode.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generation_engine import QUESTIONS  # noqa: E402 - the 16 chat prompts of every generation benchmark
from framework.generation import EngineConfig, GenerationEngine, GenerationRequest  # noqa: E402
from plugins.model._causal_lm import chat_prompt_ids  # noqa: E402
from plugins.model._llama_batched import LlamaBatchedForward  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_model():
    """SmolLM2 fp32 through the plugin (its kept dequantized weights load in ~1 s)."""
    from plugins.model.smollm2 import SmolLM2

    plugin = SmolLM2(SmolLM2.Config())
    plugin.load("cpu")
    return plugin.tokenizer, plugin.module


def run_engine(forward, tokenizer, prompts, n):
    """All ``prompts`` concurrent, ``n`` tokens each (EOS ignored). Returns (ids per prompt, wall seconds,
    (wall, process CPU) seconds of each decode-only step)."""
    cfg = EngineConfig(max_num_seqs=forward.max_num_seqs, max_num_batched_tokens=256,
                       max_model_len=forward.max_model_len)
    engine = GenerationEngine(forward, tokenizer, cfg)
    ids = {engine.add(GenerationRequest(prompt_ids=p, max_tokens=n, ignore_eos=True)): [] for p in prompts}
    steps = []
    t0 = time.perf_counter()
    while engine.has_work():
        before = engine.prefill_tokens
        t, c = time.perf_counter(), time.process_time()
        outs = engine.step()
        if engine.prefill_tokens == before and len(outs) == len(prompts):
            steps.append((time.perf_counter() - t, time.process_time() - c))
        for o in outs:
            ids[o.seq_id].extend(o.new_token_ids)
    return list(ids.values()), time.perf_counter() - t0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and one round (a smoke run)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/compiled_decode.md")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="alternating eager/compiled rounds per measurement")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 16 if args.quick else args.new_tokens
    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()

    t = time.perf_counter()
    tokenizer, model = load_model()
    load_s = time.perf_counter() - t
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    eager = LlamaBatchedForward(model, 16, args.max_model_len)
    compiled = LlamaBatchedForward(model, 16, args.max_model_len, compile_mode="default")
    warm = compiled.warmup()
    print(f"loaded in {load_s:.1f} s; compiled warm-up {warm['compile_ms'] / 1000:.1f} s "
          f"for batch buckets {warm['batch_buckets']}", flush=True)
    forwards = {"eager": eager, "compiled": compiled}
    run_engine(eager, tokenizer, prompts[:1], 4)  # eager's own cold paths

    itl: dict[tuple[str, int], list[tuple[float, float]]] = {}
    tps: dict[str, list[float]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for batch in (1, 4, 16):
        for _ in range(rounds):
            for name, fwd in forwards.items():
                ids, wall, steps = run_engine(fwd, tokenizer, prompts[:batch], n)
                itl.setdefault((name, batch), []).extend(steps)
                if batch == 16:
                    tps.setdefault(name, []).append(sum(len(i) for i in ids) / wall)
                    outputs[name] = ids
                print(f"{name:9s} batch {batch:2d}: ITL p50 {statistics.median(w for w, _ in steps) * 1000:.1f} ms"
                      f" (CPU {statistics.median(c for _, c in steps) * 1000:.1f} ms)"
                      + (f", {tps[name][-1]:.1f} tok/s" if batch == 16 else ""), flush=True)
    k = min(32, n)
    agree = sum(a[:k] == b[:k] for a, b in zip(outputs["eager"], outputs["compiled"], strict=True))
    load_after = os.getloadavg()

    rows = []
    for i, what in ((0, "ITL p50 ms"), (1, "CPU ms per decode step p50")):
        for batch in (1, 4, 16):
            e, c = (statistics.median(s[i] for s in itl[(name, batch)]) * 1000 for name in ("eager", "compiled"))
            rows.append(f"| {what}, batch {batch} | {e:.1f} | {c:.1f} | {e / c:.2f}x |")
    e, c = max(tps["eager"]), max(tps["compiled"])
    rows.append(f"| output tokens/s, 16 streams | {e:.1f} | {c:.1f} | {c / e:.2f}x |")
    cmd = " ".join(["benchmarks/compiled_decode.py", *sys.argv[1:]])
    md = "\n".join([
        "# Compiled decode step vs eager (SmolLM2-135M-Instruct, fp32, greedy, CPU)",
        "",
        f"`.venv/bin/python {cmd}`; {n} new tokens per stream, max_model_len {args.max_model_len}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} CPUs. "
        f"Eager and compiled alternate in one process ({rounds} round(s) each).",
        "",
        f"**The machine was shared with other work**: load average {load_before[0]:.1f} / {load_before[1]:.1f} / "
        f"{load_before[2]:.1f} before, {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} after "
        f"(`os.getloadavg()`, {os.cpu_count()} CPUs), so absolute numbers are pessimistic; the ratios are the point.",
        "",
        "| | eager | compiled | speed-up |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Compiled warm-up (start-up cost, batch buckets {warm['batch_buckets']}): {warm['compile_ms'] / 1000:.1f} s "
        "(from inductor's on-disk cache when an earlier run filled it; a cold compile is far longer). "
        "ITL is the p50 of decode-only engine steps "
        "(sampling and detokenizing included), wall clock; CPU ms is the process's CPU time over the same steps "
        "(with 1 torch thread, the work done: less distorted by other processes than wall clock); "
        "tokens/s counts every output token over the whole run, prefill "
        "included (prefill stays eager).",
        "",
        f"Greedy agreement, compiled vs eager, first {k} tokens of 16 prompts: {agree}/16.",
        "",
    ])
    print(md)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compiled_decode.md").write_text(md)


if __name__ == "__main__":
    main()
