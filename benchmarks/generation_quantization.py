"""Quantized generation on the real SmolLM2 (issue 18, item 4): speed, memory and the quality gate per scheme.

    .venv/bin/python benchmarks/generation_quantization.py [--quick] [--save] [--schemes none,bf16,...]
    .venv/bin/python benchmarks/generation_quantization.py --schemes "none,int8_weight_only quantization.skip=[]"

A scheme may carry overrides after it, space-separated (the second line: int8 weights for the LM head too).

Each scheme runs in its own process (so RSS is that scheme's alone): ``validate(compose(["model=smollm2",
"quantization=<scheme>"]))`` and ``prepare_generation`` (load, quantize in place, the language-model
quality gate of framework/generation/quality.py, engine, warm-up), then through the engine in-process:
  * batch-1 decode inter-token latency (median over the tokens of one greedy sequence, max_num_seqs=1);
  * output tokens/s with 16 concurrent streams (max_num_seqs=16, every prompt queued at t=0);
  * RSS after the runs and the peak (VmHWM, which includes the full-precision copy the gate keeps);
  * token agreement (the gated metric), greedy prefix agreement and the perplexity ratio from the gate.
``none`` is fp32, the reference. A scheme this hardware cannot run is reported with its refusal.
The load average (os.getloadavg) is recorded before and after: on a shared machine timings move.
``--save`` writes benchmarks/results/generation_quantization.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generation_engine import QUESTIONS  # noqa: E402 - the 16 chat prompts of every generation benchmark

RESULTS = ROOT / "benchmarks" / "results"
SCHEMES = ["none", "bf16", "int8_weight_only", "int8_dynamic", "int4_weight_only"]
LABELS = {"none": "fp32 (none)"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _weight_bytes(module) -> int:
    """Bytes the parameters hold, a torchao tensor's inner tensors (int8 data, scales) counted."""
    seen, total = set(), 0

    def inner(t):
        if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Parameter", "Tensor"):
            names, _ = t.__tensor_flatten__()
            return sum(inner(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += inner(p.data if type(p).__name__ == "Parameter" else p)
    return total


def _engine_run(model, prompts, n, max_num_seqs):
    from framework.generation import EngineConfig, GenerationEngine, GenerationRequest

    max_len = max(len(p) for p in prompts) + n
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_model_len=max_len)
    engine = GenerationEngine(model.batched_forward(max_num_seqs, max_len), model.tokenizer, cfg)
    t0 = time.perf_counter()
    ids = [engine.add(GenerationRequest(prompt_ids=p, max_tokens=n, ignore_eos=True)) for p in prompts]
    times: dict[int, list[float]] = {i: [] for i in ids}
    tokens = 0
    while engine.has_work():
        step = engine.step()
        now = time.perf_counter() - t0
        for o in step:
            times[o.seq_id].extend([now] * len(o.new_token_ids))
            tokens += len(o.new_token_ids)
    return tokens, time.perf_counter() - t0, [times[i] for i in ids]


def one(scheme: str, n: int, streams: int, threads: int = 0) -> dict:
    """One scheme (its name, then any overrides), in this process: start it as the worker does, then time
    the engine."""
    import torch

    from framework.config import ConfigError, compose, validate
    from framework.generation_worker import prepare_generation

    if threads:
        torch.set_num_threads(threads)  # on a shared box, 1 thread avoids OpenMP barrier stalls
    out: dict = {"scheme": scheme, "torch_threads": torch.get_num_threads()}
    try:
        name, *overrides = scheme.split()
        r = validate(compose(["model=smollm2", f"quantization={name}", *overrides]))
    except ConfigError as exc:
        out["refused"] = str(exc).split("\n", 1)[-1].strip()
        return out
    t = time.perf_counter()
    _, report = prepare_generation(r.model, r.quantization, r.hardware, "cpu", r.batching.engine_config())
    out["startup_s"] = round(time.perf_counter() - t, 1)
    out["report"] = {k: report.get(k) for k in ("load_ms", "reference_copy_ms", "quantize_ms", "quality_gate_ms",
                                                 "warmup_ms", "quality_gate", "quality_floor",
                                                 "quantization_applied")}
    q = report.get("quality") or {}
    reference = 1.0 if scheme == "none" else None
    out["token_agreement"] = q.get("token_agreement", reference)
    out["greedy_prefix_agreement"] = q.get("greedy_prefix_agreement", reference)
    out["perplexity_ratio"] = report.get("perplexity_ratio", reference)
    out["perplexity"] = q.get("perplexity")
    model = r.model
    prompts = [model.prompt_ids({"messages": [{"role": "user", "content": q}]}) for q in QUESTIONS]
    with torch.inference_mode():
        _engine_run(model, prompts[:2], 4, 2)  # warm the shapes
        itls = []
        for _ in range(2):  # best of two: the machine is shared
            _, _, (times,) = _engine_run(model, prompts[:1], n, 1)
            itls.append(statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) * 1e3)
        out["itl_b1_ms"] = round(min(itls), 2)
        out["ttft_b1_ms"] = round(times[0] * 1e3, 1)
        tokens, elapsed, _ = _engine_run(model, (prompts * streams)[:streams], n, streams)
        out["tokens_per_s_16"] = round(tokens / elapsed, 1)
    out["weights_mib"] = round(_weight_bytes(model.module) / 2**20, 1)
    out["rss_mib"] = round(_status_kib("VmRSS") / 1024)
    out["peak_rss_mib"] = round(_status_kib("VmHWM") / 1024)
    return out


def _row(res: dict) -> str:
    label = LABELS.get(res["scheme"], res["scheme"])
    if "refused" in res:
        return f"| {label} | refused before start: {res['refused']} | | | | | | | |"

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"| {label} | {f(res['itl_b1_ms'], '.1f')} | {f(res['tokens_per_s_16'], '.1f')} | "
            f"{res['weights_mib']} | {res['rss_mib']} | {res['peak_rss_mib']} | {f(res['token_agreement'], '.4f')} | "
            f"{f(res['greedy_prefix_agreement'], '.3f')} | {f(res['perplexity_ratio'], '.4f')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 new tokens, no int8_dynamic")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/generation_quantization.md")
    ap.add_argument("--schemes", default="")
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per scheme process; 0: torch's default")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one scheme, print JSON
    args = ap.parse_args()
    n = args.new_tokens or (16 if args.quick else 48)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, n, args.streams, args.threads)))
        return
    schemes = [s for s in args.schemes.split(",") if s] or [s for s in SCHEMES
                                                           if not (args.quick and s == "int8_dynamic")]
    load_before = os.getloadavg()
    results = []
    for scheme in schemes:
        cmd = [sys.executable, __file__, "--one", scheme, "--new-tokens", str(n), "--streams", str(args.streams),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            res = {"scheme": scheme, "refused": f"failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}"}
        else:
            res = json.loads(line[len("RESULT "):])
        results.append(res)
        print(json.dumps(res), flush=True)
    load_after = os.getloadavg()
    md = [
        "# Quantized generation (SmolLM2-135M-Instruct, CPU, greedy)", "",
        f"`.venv/bin/python benchmarks/generation_quantization.py{' --quick' if args.quick else ''}`: "
        f"each scheme in its own process, started with `prepare_generation` (quantize in place + the "
        f"language-model quality gate), then the engine in-process: batch-1 ITL (median, best of 2, "
        f"{n} tokens) and output tokens/s with {args.streams} concurrent streams ({n} tokens each, "
        f"ignore_eos). {os.cpu_count()} CPUs, torch threads {results[0].get('torch_threads', '?')}.", "",
        f"**The machine was shared with other work**: load average (1, 5, 15 min) "
        f"{tuple(round(x, 1) for x in load_before)} before and {tuple(round(x, 1) for x in load_after)} after, "
        "so absolute timings are inflated and noisy; compare schemes within this run.", "",
        "| scheme | ITL b1 ms | tok/s @16 | weights MiB | RSS MiB | peak RSS MiB | token agreement (gated) | "
        "greedy prefix agreement | perplexity ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_row(r) for r in results), "",
        "Token agreement: the reference's greedy tokens (32 per calibration prompt, 4 prompts) read back by the "
        "quantized model with teacher forcing; the fraction it would pick itself. Greedy prefix agreement: "
        "both generate freely; the fraction before the first divergence (mean over prompts). Perplexity ratio: "
        "quantized / fp32 on the gate's English paragraph. Peak RSS includes the fp32 copy the gate holds "
        "while it measures (freed before serving).", "",
    ]
    for r in results:
        if "report" in r:
            md.append(f"- {r['scheme']}: start {r['startup_s']} s, {json.dumps(r['report'])}")
    text = "\n".join(md) + "\n"
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generation_quantization.md").write_text(text)


if __name__ == "__main__":
    main()
