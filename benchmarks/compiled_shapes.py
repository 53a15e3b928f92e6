"""Which compiled graph serves a single short request, depending on the shapes warmed up (issue 3).

    python benchmarks/compiled_shapes.py

MiniLM with `experiment=cpu_low_latency` (int8_dynamic, compiled), two fresh processes: one warmed
over batch size 1 only (plus the sequence buckets), one over every batch bucket 1..32 as the server
does. Each then times `model.forward` on one 16-token sentence (batch 1). With torch.compile's
automatic dynamic shapes, warming several batch sizes makes the batch dimension dynamic, and that
graph then serves batch 1 too. Writes benchmarks/results/compiled_shapes.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from framework.config import compose, validate
from framework.engine import prepare_model
sizes = json.loads(sys.argv[2])
r = validate(compose(["experiment=cpu_low_latency", f"hardware.compile_cache_dir={sys.argv[3]}"]))
m = r.model
report = prepare_model(m, r.quantization, r.hardware, "cpu", sizes)
x = m.preprocess(["How do I reset my password on the new account page?"])
for _ in range(20):
    m.forward(x)
ts = []
for _ in range(300):
    t = time.perf_counter(); m.forward(x); ts.append(time.perf_counter() - t)
ts.sort()
print("RESULT", json.dumps({"p50_ms": ts[150] * 1000, "compile_ms": report.get("compile_ms"),
                            "shape": list(x[0].shape)}))
"""


def run(sizes: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(sizes), cache],
                             capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def main() -> int:
    from benchmarks._common import machine, write_results

    rows = {"batch 1 only": run([1]), "batch buckets 1..32 (as served)": run([1, 2, 4, 8, 16, 32])}
    base = rows["batch 1 only"]["p50_ms"]
    lines = ["# Compiled graph for a single short request (benchmarks/compiled_shapes.py)", "",
             f"Command: `python benchmarks/compiled_shapes.py`; machine {machine()}; experiment=cpu_low_latency "
             "(int8_dynamic, torch.compile default mode, compile_dynamic null); every warm-up also runs one input "
             "per sequence bucket; 300 timed `model.forward` calls on a batch-1, 16-token input.", "",
             "| warm-up batch sizes | forward p50 ms | vs batch-1-only | compile ms |", "| --- | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p50_ms'] / base:.2f}x | {r['compile_ms']:.0f} |")
    path = write_results("compiled_shapes", "\n".join(lines) + "\n", {"rows": rows, "machine": machine()})
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
