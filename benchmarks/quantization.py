"""Quantization schemes on the CPU with all-MiniLM-L6-v2: eager vs compiled, against fp32 eager.

    python benchmarks/quantization.py            # every scheme that runs on this CPU, batch 1/8/32
    python benchmarks/quantization.py --quick    # smoke test: batch 1, fp32 eager + int8_dynamic eager/compiled

What it does, in one run so every number has its baseline beside it:

1. Builds each variant through the worker's real start-up path (``framework.engine.prepare_model``:
   load -> quantize -> quality gate -> torch.compile + warm-up) with the built-in plugins
   (``hardware=cpu``, ``hardware.compile=off`` for eager, ``default`` for compiled, and ``default``
   with ``hardware.cpp_wrapper=true`` for "compiled+cpp": inductor's generated code calls its kernels
   from C++ instead of Python). Schemes this CPU cannot run (fp16, int4, float8) are listed with the
   reason the framework gives.
2. Feeds 32-token inputs (``model.max_length=32``: every input is truncated to exactly 32 tokens)
   and times ``model.forward`` only (tokenisation and JSON are the same for every scheme).
3. Interleaves the variants in rounds (baseline, a, b, ..., baseline, a, b, ...) so drift and noise
   from other processes hit all of them alike; reports the median per variant and batch size.
4. Prints and writes ``benchmarks/results/quantization.md`` (+ ``.json``; ``--quick`` writes
   ``quantization_quick.*``): latency ratio to fp32 eager, speed-up, and the cosine similarity of
   each variant's embeddings to fp32 eager's on the same inputs, then names the best scheme at batch 1
   with cosine >= 0.99 and whether it reaches the goal (>= 3x faster than fp32 eager).

Absolute milliseconds are in the JSON only (CPU numbers depend on the machine; the ratio is the claim).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, write_results  # noqa: E402
from framework import registry  # noqa: E402
from framework.engine import QualityGateError, prepare_model  # noqa: E402

SCHEMES = ["none", "bf16", "fp16", "int8_weight_only", "int8_dynamic", "int4_weight_only", "float8_dynamic"]
QUICK_SCHEMES = ["none", "int8_dynamic"]
GOAL_SPEEDUP = 3.0
GOAL_COSINE = 0.99
SEQ_LEN = 32

# Long enough that each one is truncated to exactly SEQ_LEN tokens.
_PHRASES = [
    "how do I reset my password when the recovery email never arrives",
    "the quick brown fox jumps over the lazy dog near the quiet river bank",
    "quantization trades numeric precision for speed on commodity processors",
    "what is the weather like in paris tomorrow afternoon and the day after",
    "a cache hit should cost one round trip and nothing more than that",
    "transformers encode text into dense vectors that capture its meaning",
    "my order arrived damaged and I would like a refund or a replacement",
    "latency matters more than throughput for interactive users of search",
]


def inputs(n: int) -> list[str]:
    return [f"{_PHRASES[i % 8]} and {_PHRASES[(i + 3) % 8]} while {_PHRASES[(i + 5) % 8]}" for i in range(n)]


def build_variant(scheme: str, compile_mode: str, batch_sizes: list[int], threads: int | None,
                  cpp_wrapper: bool = False) -> dict:
    """One model instance prepared like a worker would; returns it with its start-up report."""
    model_cls = registry.get("model", "minilm")
    model = model_cls(model_cls.Config(max_length=SEQ_LEN, seq_buckets=[SEQ_LEN]))
    quant_cls = registry.get("quantization", scheme)
    qcfg = quant_cls.Config()
    if hasattr(qcfg, "allow_slow"):
        qcfg.allow_slow = True  # measure it even where the framework would refuse it as slow
    qcfg.min_quality = None  # report quality, never refuse here
    hw_cls = registry.get("hardware", "cpu")
    hw = hw_cls(hw_cls.Config(compile=compile_mode, threads=threads, batch_buckets=batch_sizes,
                              cpp_wrapper=cpp_wrapper))
    report = prepare_model(model, quant_cls(qcfg), hw, "cpu", batch_sizes)
    return {"model": model, "report": report}


def time_forward(model, batch, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model.forward(batch)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def cosine_min(model, reference, candidate) -> float:
    """The model's own quality measure (cosine for minilm), worst item."""
    return float(model.quality(reference, candidate)["min"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 1, none (eager) + int8_dynamic (eager, compiled), few iterations")
    parser.add_argument("--schemes", nargs="*", help=f"subset of {', '.join(SCHEMES)}")
    parser.add_argument("--batch-sizes", nargs="*", type=int)
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--calls", type=int, help="forward calls per variant per round (default 20, quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"],
                        help="hardware.compile for the compiled variants (max-autotune: CPU GEMM templates, "
                        "slower to compile)")
    parser.add_argument("--no-cpp-wrapper", dest="cpp_wrapper", action="store_false",
                        help="skip the 'compiled+cpp' rows (each compiled scheme again with hardware.cpp_wrapper=true)")
    parser.add_argument("--name", help="result file name under benchmarks/results (default: quantization, "
                        "or quantization_quick with --quick)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from plugins.hardware._base import cpu_info
    from plugins.quantization._common import support_problem

    schemes = args.schemes or (QUICK_SCHEMES if args.quick else SCHEMES)
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8, 32])
    rounds = args.rounds or (3 if args.quick else 7)
    calls = args.calls or (5 if args.quick else 20)
    info = cpu_info()

    refused, variants = {}, {}
    started = time.perf_counter()
    for scheme in schemes:
        problem = support_problem(scheme, info)
        if problem is not None:
            refused[scheme] = problem
            print(f"skip {scheme}: {problem}", flush=True)
            continue
        # quick: only the candidate is compiled (each minilm compile costs tens of seconds on 2 cores)
        modes = ["eager"] if args.quick and scheme == "none" else ["eager", "compiled"]
        if args.cpp_wrapper and "compiled" in modes and not args.quick:
            modes.append("compiled+cpp")
        for mode_name in modes:
            key = (scheme, mode_name)
            print(f"preparing {scheme} {key[1]} ...", flush=True)
            try:
                mode = "off" if mode_name == "eager" else args.compile_mode
                variants[key] = build_variant(scheme, mode, batch_sizes, args.threads,
                                              cpp_wrapper=mode_name == "compiled+cpp")
            except (QualityGateError, RuntimeError) as exc:
                refused[f"{scheme} {key[1]}"] = f"{type(exc).__name__}: {exc}"
                print(f"  failed: {exc}", flush=True)
    baseline_key = ("none", "eager")
    if baseline_key not in variants:
        print("the fp32 eager baseline did not build; nothing to compare against", file=sys.stderr)
        return 1
    baseline = variants[baseline_key]["model"]
    texts = inputs(max(batch_sizes))

    rows = []
    for bs in batch_sizes:
        batch = baseline.preprocess(texts[:bs])
        assert tuple(batch[0].shape) == (bs, SEQ_LEN), batch[0].shape
        with torch.inference_mode():
            ref_out = baseline.forward(batch)
        samples: dict = {key: [] for key in variants}
        for _ in range(rounds):
            for key, v in variants.items():
                samples[key] += time_forward(v["model"], batch, calls)
        base_ms = statistics.median(samples[baseline_key])
        for key, v in variants.items():
            ms = statistics.median(samples[key])
            rows.append({"scheme": key[0], "mode": key[1], "batch": bs, "median_ms": round(ms, 3),
                         "latency_ratio": round(ms / base_ms, 3), "speedup": round(base_ms / ms, 2),
                         "cosine_min": round(cosine_min(baseline, ref_out, v["model"].forward(batch)), 5)})
        print(f"batch {bs}: measured {len(variants)} variants", flush=True)

    ok = [r for r in rows if r["batch"] == min(batch_sizes) and r["cosine_min"] >= GOAL_COSINE]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None
    startup = {f"{k[0]} {k[1]}": {f: v["report"].get(f) for f in ("load_ms", "quantize_ms", "gate_ms", "compile_ms",
                                                                    "warmup_ms", "startup_ms", "quality")}
               for k, v in variants.items()}
    markdown = render(rows, refused, best, startup, args.quick, info)
    print("\n" + markdown)
    data = {"when": datetime.now(timezone.utc).isoformat(), "quick": args.quick, "machine": machine(),
            "cpu": info.device_name, "cpu_features": info.extra, "torch_threads": torch.get_num_threads(),
            "seq_len": SEQ_LEN, "compile_mode": args.compile_mode, "rounds": rounds, "calls": calls,
            "rows": rows, "refused": refused,
            "startup": startup, "best": best, "goal": {"speedup": GOAL_SPEEDUP, "cosine": GOAL_COSINE},
            "goal_met": bool(best and best["speedup"] >= GOAL_SPEEDUP),
            "elapsed_s": round(time.perf_counter() - started, 1)}
    path = write_results(args.name or ("quantization_quick" if args.quick else "quantization"), markdown, data)
    print(f"wrote {path} (+ .json) in {data['elapsed_s']} s")
    del variants
    gc.collect()
    return 0


def render(rows: list[dict], refused: dict, best: dict | None, startup: dict, quick: bool, info) -> str:
    lines = [f"# Quantization on the CPU: all-MiniLM-L6-v2, {SEQ_LEN}-token inputs{' (quick)' if quick else ''}",
             "", f"CPU: {info.device_name or 'unknown'}; baseline: fp32 eager in the same run. "
             "latency ratio = variant / baseline (lower is better), speed-up = baseline / variant; "
             "cosine = worst item's cosine similarity to fp32 eager's embeddings.", "",
             "| scheme | mode | batch | latency ratio | speed-up | cosine (min) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['mode']} | {r['batch']} | {r['latency_ratio']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['cosine_min']:.4f} |")
    lines += ["", "Start-up (ms, through `framework.engine.prepare_model`):", "",
              "| variant | load | quantize | gate | compile | warm-up | total |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in startup.items():
        lines.append(f"| {name} | {s['load_ms']:.0f} | {s['quantize_ms']:.0f} | {s['gate_ms']:.0f} | "
                     f"{s['compile_ms']:.0f} | {s['warmup_ms']:.0f} | {s['startup_ms']:.0f} |")
    if refused:
        lines += ["", "Not measured:", ""] + [f"- **{k}**: {v}" for k, v in refused.items()]
    lines.append("")
    if best is None:
        lines.append(f"No variant reached cosine >= {GOAL_COSINE} at batch 1.")
    else:
        met = "met" if best["speedup"] >= GOAL_SPEEDUP else "NOT met"
        lines.append(f"**Best at batch {best['batch']}: {best['scheme']} {best['mode']}**, {best['speedup']:.2f}x "
                     f"fp32 eager, cosine {best['cosine_min']:.4f}. Goal (>= {GOAL_SPEEDUP:.0f}x, cosine >= "
                     f"{GOAL_COSINE}): {met}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
