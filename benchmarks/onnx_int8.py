"""Which ONNX Runtime int8 recipe passes MiniLM's 0.99 gate, and what each costs (issue 21 item 5), model-side.

    python benchmarks/onnx_int8.py            # writes benchmarks/results/onnx_int8.md

The model is exported exactly as `hardware.runtime=onnxruntime` does (plugins/hardware/_onnx.py). Then:
1. quality of ORT's dynamic int8 recipes on the quality gate's own inputs (the model's calibration
   sentences, as one batch): per-tensor weight scales (ORT's default), per-channel, and per-channel with
   layers kept in fp32;
2. the one-layer sensitivity: each weight matmul quantized alone, ranked by the cosine it leaves;
   the greedy recipe keeps the worst ones in fp32 until the gate passes with a margin (>= 0.995);
3. latency of one 12-token sentence, interleaved in rounds: torch fp32 eager, ORT fp32, ORT int8
   (every layer) and the greedy recipe. The load average is printed beside it: the machine is shared.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# as a hydraserve worker runs (hardware.spin_wait=false): spinning OpenMP threads beside any other busy
# process make torch's baseline many times slower; read by libgomp when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from benchmarks._common import machine, write_results  # noqa: E402

SENTENCE = "How do I reset my password on the new account page?"
MARGIN = 0.995


def main() -> int:
    import onnx
    import onnxruntime as ort
    import torch

    from plugins.hardware import _onnx
    from plugins.model._text_embedding import CALIBRATION_SENTENCES
    from plugins.model.minilm import MiniLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = MiniLM()
    model.load("cpu")
    folder = Path(tempfile.mkdtemp(prefix="onnx-int8-"))
    fp32 = folder / "fp32.onnx"
    _onnx.export(model.module, model.preprocess(model.example_items(2)), fp32, 17)
    ids, mask = model.preprocess(CALIBRATION_SENTENCES)
    with torch.inference_mode():
        reference = model.module(ids, mask).numpy()
    feeds = {"input_0": ids.numpy(), "input_1": mask.numpy()}

    def session(path: Path):
        return _onnx.open_session(path, ["CPUExecutionProvider"], None, False)

    def gate_cosine(path: Path) -> float:
        out = session(path).run(None, feeds)[0]
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        return float(cos.min())

    graph = onnx.load(str(fp32), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    layers = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]

    def quantized(name: str, exclude: list[str], per_channel: bool = True) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = folder / f"{name}.onnx"
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
        return path

    recipes = {"per-tensor, every layer": gate_cosine(quantized("per_tensor", [], per_channel=False)),
               "per-channel, every layer": gate_cosine(quantized("per_channel", []))}
    sensitivity = {n: gate_cosine(quantized("one", [x for x in layers if x != n])) for n in layers}
    order = sorted(layers, key=lambda n: sensitivity[n])
    kept: list[str] = []
    greedy = gate_cosine(quantized("greedy", kept))
    while greedy < MARGIN and len(kept) < len(layers):
        kept.append(order[len(kept)])
        greedy = gate_cosine(quantized("greedy", kept))
    recipes[f"per-channel, {len(kept)} most sensitive kept fp32"] = greedy
    print(recipes, kept, flush=True)

    # The shipped preset's own exclusions (its patterns, as hardware.onnx_int8_exclude matches them): the
    # forward a `experiment=cpu_low_latency` server runs, to set beside the forward span of its traces.
    import fnmatch

    from omegaconf import OmegaConf

    preset = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/experiment/cpu_low_latency.yaml")
    patterns = list(preset.hardware.onnx_int8_exclude)
    shipped = [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    recipes[f"per-channel, the shipped preset's {len(shipped)} kept fp32 (`experiment=cpu_low_latency`)"] = \
        gate_cosine(quantized("shipped", shipped))
    sessions = {"ORT fp32": session(fp32), "ORT int8 per-channel, every layer": session(folder / "per_channel.onnx"),
                f"ORT int8, {len(kept)} kept fp32": session(folder / "greedy.onnx"),
                "ORT int8, the shipped preset": session(folder / "shipped.onnx")}
    one_ids, one_mask = model.preprocess([SENTENCE])  # padded to the sequence bucket, as the server does
    one = {"input_0": one_ids.numpy(), "input_1": one_mask.numpy()}
    calls = {"torch fp32 eager": lambda: model.module(one_ids, one_mask)}
    calls.update({k: (lambda s=s: s.run(None, one)) for k, s in sessions.items()})
    times: dict[str, list[float]] = {k: [] for k in calls}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for f in calls.values():
            for _ in range(20):
                f()
        for _ in range(20):
            for k, f in calls.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    f()
                times[k].append((time.perf_counter() - t0) / 20 * 1000)
    load.append(os.getloadavg()[0])
    base = statistics.median(times["torch fp32 eager"])
    lines = ["# ONNX Runtime int8 recipes for MiniLM (benchmarks/onnx_int8.py)", "",
             f"Machine: {machine()}; onnxruntime {ort.__version__}; load average {load[0]:.2f} -> {load[1]:.2f} "
             "(timings are only comparable within this run).", "",
             "| recipe | gate cosine (min over the calibration sentences) | passes 0.99 |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {v:.4f} | {'yes' if v >= 0.99 else 'no'} |" for k, v in recipes.items()]
    lines += ["", f"Kept in fp32 (worst first): {', '.join(f'`{n}` ({sensitivity[n]:.4f} alone)' for n in kept)}", "",
              "| forward, one 12-token sentence | median ms of 20 rounds | speed-up vs torch fp32 eager |",
              "| --- | ---: | ---: |"]
    lines += [f"| {k} | {statistics.median(v):.2f} | {base / statistics.median(v):.2f}x |" for k, v in times.items()]
    path = write_results("onnx_int8", "\n".join(lines) + "\n",
                         {"recipes": recipes, "kept": kept, "sensitivity": sensitivity,
                          "times_ms": times, "load": load, "machine": machine()})
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
