"""SmolLM2's weight matrices through ``F.linear`` and through oneDNN-packed weights (``hardware.packed_weights``).

    .venv/bin/python benchmarks/packed_linear.py [--rounds 5] [--save]

The matmuls alone, no model code: every 2-D weight of SmolLM2-135M-Instruct (211 matrices, the tied
LM head included: 0.54 GB of float32) times a batch of ``rows`` activations, once each per pass, at
the row counts a decode step sees (1 stream to 64), with torch's default thread count (what the
worker uses). Each round times both kernels back to back (the median of 9 passes each), so load
drift hits both; the table gives the range over rounds of the per-round ratio. Also checked: the
outputs agree to float32 rounding. ``--save`` writes benchmarks/results/packed_linear.md.

What a server sees end to end (the engine's ITL and tokens/s with and without packing, and quality)
comes from ``benchmarks/generation_quantization.py --schemes "none,none hardware.packed_weights=false"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.model._causal_lm import load_smollm2  # noqa: E402
from plugins.model._packed_linear import PACK_ROWS, PackedLinear  # noqa: E402

ROWS = (1, 4, 16, 64)
PASSES = 9


def time_pass(fn, xs) -> float:
    """The median over ``PASSES`` of one pass over every weight (ms)."""
    times = []
    for _ in range(PASSES):
        t = time.perf_counter()
        for x, f in zip(xs, fn, strict=True):
            f(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    _, model = load_smollm2()
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    gigabytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    linears = [torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights]
    for lin, w in zip(linears, weights, strict=True):
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
    plain = [lin.forward for lin in linears]
    packed = [PackedLinear(lin).forward for lin in linears]
    load_before = [round(x, 2) for x in os.getloadavg()]
    results: dict[int, dict[str, list[float]]] = {r: {"plain": [], "packed": []} for r in ROWS}
    worst = 0.0
    with torch.inference_mode():
        for rows in ROWS:
            xs = [torch.randn(rows, w.shape[1]) for w in weights]
            for x, p, q in zip(xs, plain, packed, strict=True):
                worst = max(worst, ((p(x) - q(x)).abs().max() / p(x).abs().max().clamp_min(1e-30)).item())
            time_pass(plain, xs), time_pass(packed, xs)  # warm-up
            for _ in range(args.rounds):
                results[rows]["plain"].append(time_pass(plain, xs))
                results[rows]["packed"].append(time_pass(packed, xs))
            print(rows, {k: [round(v, 1) for v in vs] for k, vs in results[rows].items()}, flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]

    lines = [
        "# SmolLM2's weight matrices: `F.linear` vs oneDNN-packed weights (`hardware.packed_weights`)", "",
        f"`.venv/bin/python benchmarks/packed_linear.py --rounds {args.rounds}`, "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {len(weights)} float32 matrices "
        f"({gigabytes:.2f} GB), one pass = each matrix times `rows` activations once; median of {PASSES} "
        f"passes per kernel per round, {args.rounds} rounds, the kernels alternating. Packed for "
        f"{PACK_ROWS} rows. Load average before {load_before}, after {load_after}.", "",
        "| rows | `F.linear` ms per pass | packed ms per pass | speed-up (per round) | GB/s packed |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for rows in ROWS:
        p, q = results[rows]["plain"], results[rows]["packed"]
        ratios = [a / b for a, b in zip(p, q, strict=True)]
        lines.append(f"| {rows} | {statistics.median(p):.1f} | {statistics.median(q):.1f} | "
                     f"{min(ratios):.2f}..{max(ratios):.2f}x | {gigabytes / (statistics.median(q) / 1e3):.1f} |")
    lines += ["", f"Largest difference between the two outputs, relative to the output's largest value: "
              f"{worst:.1e} (float32 summation order)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        (ROOT / "benchmarks" / "results" / "packed_linear.md").write_text(text)


if __name__ == "__main__":
    main()
