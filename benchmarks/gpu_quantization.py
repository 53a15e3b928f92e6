"""Quantization schemes on one NVIDIA GPU: a BERT-base-sized encoder and ResNet-50, random weights.

    python benchmarks/gpu_quantization.py            # both models, all schemes, compiled / + CUDA graphs
    python benchmarks/gpu_quantization.py --budget-s 420   # stop starting variants after 7 minutes
    python benchmarks/gpu_quantization.py --quick    # BERT only; fp32, bf16, int8_dynamic
    python benchmarks/gpu_quantization.py --models bert --schemes bf16 float8_dynamic --modes graphs

Without CUDA it prints why and exits 0 (importable anywhere; torch is imported inside functions).

Each variant goes through the worker's real start-up path (``framework.engine.prepare_model`` with the
built-in quantization plugins and ``hardware=cuda``): quantize, quality gate against an fp32 copy
(the cosine reported here), torch.compile (``default``; ``graphs`` = CUDA graphs, i.e.
``reduce-overhead``) and warm-up at each batch size. Latency is the median of ``--iters`` forward
passes timed with CUDA events. Ratios are to fp32 eager at the same batch size, measured in the same
run. Schemes the GPU cannot run (float8 below compute capability 8.9, ...) are listed with the
framework's refusal. Note: torchao's schemes rewrite ``nn.Linear`` layers only, so on ResNet-50 the
int8 / int4 / float8 schemes touch only its final ``fc`` layer (which the default ``skip`` keeps in
full precision); only ``bf16`` changes its convolutions.

The models are built here, with seeded random weights (no download, no torchvision, no transformers):
BERT-base (12 layers, hidden 768, 12 heads, FFN 3072, 128 tokens) and ResNet-50 (bottleneck 3-4-6-3,
224x224 images, 1000 classes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framework import ModelPlugin  # noqa: E402

SCHEMES = ["none", "bf16", "float8_dynamic", "int8_dynamic", "int4_weight_only"]
QUICK_SCHEMES = ["none", "bf16", "int8_dynamic"]
MODES = ["compiled", "graphs"]  # + "eager" on request; fp32 eager is always measured: it is the baseline
MODELS = ["bert", "resnet50"]
BATCH_SIZES = [1, 256]
SEQ_LEN = 128


# ------------------------------------------------------------------------------------------ models
def build_bert(seed: int = 0) -> Any:
    """A BERT-base-sized encoder (every projection an ``nn.Linear``, as in Hugging Face's BERT)."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d: int = 768, heads: int = 12, ffn: int = 3072):
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            att = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
            x = self.ln1(x + self.o(att.transpose(1, 2).reshape(b, t, d)))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self, vocab: int = 30522, d: int = 768, layers: int = 12):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(512, d)
            self.ln = nn.LayerNorm(d)
            self.layers = nn.ModuleList(Layer(d) for _ in range(layers))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.ln(self.tokens(ids) + self.positions(pos))
            for layer in self.layers:
                x = layer(x)
            return x.mean(dim=1)  # mean-pooled sentence vector, like the served embedders

    torch.manual_seed(seed)
    return Encoder()


def build_resnet50(seed: int = 0) -> Any:
    """ResNet-50 v1.5 (stride on the 3x3 conv), as torchvision builds it."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = width * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    class ResNet50(nn.Module):
        def __init__(self, classes: int = 1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for width, depth, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(depth):
                    blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(2048, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))

    torch.manual_seed(seed)
    return ResNet50()


class SyntheticModel(ModelPlugin):
    """A model plugin around a built-in random-weight model: an item is a seed for one input."""

    task = "tensor"

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def load(self, device: str) -> None:
        self.device = device
        builder = build_bert if self.kind == "bert" else build_resnet50
        self.module = builder().eval().to(device)

    def make_batch(self, items: list[int]) -> Any:
        import torch

        gen = torch.Generator().manual_seed(int(items[0]) * 7919 + len(items))
        if self.kind == "bert":
            x = torch.randint(1000, 30000, (len(items), SEQ_LEN), generator=gen)
        else:
            x = torch.randn(len(items), 3, 224, 224, generator=gen)
        return x.to(self.device)

    def preprocess(self, items: list[Any]) -> Any:
        return self.make_batch(items)

    def forward(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(batch)

    def calibration_items(self) -> list[Any]:
        return list(range(16))

    def quality(self, reference: Any, candidate: Any) -> dict:
        import torch

        cos = torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=1)
        return {"metric": "cosine", "min": float(cos.min()), "mean": float(cos.mean())}


# --------------------------------------------------------------------------------------- measuring
def measure(model: SyntheticModel, batch_size: int, iters: int) -> float:
    """Median forward latency in ms (CUDA events; the batch is already on the GPU)."""
    import torch

    batch = model.make_batch(list(range(batch_size)))
    for _ in range(3):
        model.forward(batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.forward(batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_variant(kind: str, scheme: str, mode: str, batch_sizes: list[int], iters: int) -> dict:
    import gc

    import torch

    from framework import registry
    from framework.engine import prepare_model

    quant_cls = registry.get("quantization", scheme)
    qcfg = quant_cls.Config()
    qcfg.min_quality = None  # measure, never refuse
    if hasattr(qcfg, "allow_slow"):
        qcfg.allow_slow = True
    hw_cls = registry.get("hardware", "cuda")
    hw = hw_cls(hw_cls.Config(compile="off" if mode == "eager" else "default", cuda_graphs=mode == "graphs",
                              compile_dynamic=False, batch_buckets=sorted(batch_sizes)))
    model = SyntheticModel(kind)
    try:
        report = prepare_model(model, quant_cls(qcfg), hw, "cuda", batch_sizes)
        latency = {bs: round(measure(model, bs, iters), 4) for bs in batch_sizes}
        return {"report": report, "latency_ms": latency,
                "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()  # each variant compiles from a clean slate (its cache entries stay on disk)


def render(rows: list[dict], refused: dict, device: str) -> str:
    lines = [f"# Quantization on {device}", "",
             "Baseline: fp32 eager of the same model and batch size, in the same run. ratio = variant / baseline "
             "latency (lower is better); cosine = worst calibration item vs fp32.", "",
             "| model | scheme | mode | batch | latency ms | ratio | speed-up | cosine (min) | compile s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cos = f"{r['cosine']:.4f}" if r["cosine"] is not None else "-"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['mode']} | {r['batch']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.2f} | {1 / r['ratio']:.2f}x | {cos} | {r['compile_s']:.1f} |")
    if refused:
        lines += ["", "Not measured:", ""] + [f"- **{k}**: {v}" for k, v in refused.items()]
    return "\n".join(lines) + "\n"


def plan(models: list[str], schemes: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    """The variants in the order they run: the ones that say most first, so a time budget cuts the rest.

    BERT before ResNet-50; on ResNet-50 the Linear-only schemes (which change nothing but its
    skipped ``fc`` layer) come last.
    """
    linear_only = {"float8_dynamic", "int8_dynamic", "int4_weight_only", "int8_weight_only"}
    first, last = [], []
    for kind in models:
        for scheme in schemes:
            for mode in modes:
                if scheme == "none" and mode == "eager":
                    continue  # the baseline, measured before anything else
                (last if kind == "resnet50" and scheme in linear_only else first).append((kind, scheme, mode))
    return first + last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="BERT only, fp32 / bf16 / int8_dynamic, 20 iterations")
    parser.add_argument("--models", nargs="*", choices=MODELS)
    parser.add_argument("--schemes", nargs="*", choices=SCHEMES)
    parser.add_argument("--modes", nargs="*", choices=["eager", *MODES])
    parser.add_argument("--batch-sizes", nargs="*", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--budget-s", type=float, help="start no new variant after this many seconds "
                        "(the table is rewritten after each variant, so a run cut short still leaves one)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available: skipping the GPU quantization benchmark (run it on a GPU machine).")
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    from benchmarks._common import machine, write_results

    models = args.models or (["bert"] if args.quick else MODELS)
    schemes = args.schemes or (QUICK_SCHEMES if args.quick else SCHEMES)
    modes = args.modes or MODES
    batch_sizes = sorted(args.batch_sizes or BATCH_SIZES)
    iters = args.iters or (20 if args.quick else 100)
    device = f"{torch.cuda.get_device_name(0)} (cc {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
    name = "gpu_quantization_quick" if args.quick else "gpu_quantization"
    started = time.perf_counter()
    rows, refused, raw, bases = [], {}, {}, {}

    def save() -> None:
        write_results(name, render(rows, refused, device),
                      {"when": datetime.now(timezone.utc).isoformat(), "device": device, "machine": machine(),
                       "torch": torch.__version__, "iters": iters, "rows": rows, "refused": refused,
                       "variants": raw, "elapsed_s": round(time.perf_counter() - started, 1),
                       "command": "python benchmarks/gpu_quantization.py " + " ".join(argv or sys.argv[1:])})

    def add_rows(kind: str, scheme: str, mode: str, result: dict) -> None:
        quality = result["report"].get("quality") or {}
        for bs in batch_sizes:
            ms = result["latency_ms"][bs]
            rows.append({"model": kind, "scheme": scheme, "mode": mode, "batch": bs,
                         "ms": ms, "ratio": ms / bases[kind]["latency_ms"][bs],
                         "cosine": quality.get("min"), "compile_s": result["report"].get("compile_ms", 0.0) / 1000.0})

    for kind, scheme, mode in plan(models, schemes, modes):
        label = f"{kind} {scheme} {mode}"
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            refused[label] = f"not run: the time budget ({args.budget_s:.0f} s, --budget-s) was spent"
            continue
        if kind not in bases:
            print(f"{kind} none eager (baseline) ...", flush=True)
            bases[kind] = raw[f"{kind} none eager"] = run_variant(kind, "none", "eager", batch_sizes, iters)
            add_rows(kind, "none", "eager", bases[kind])
        print(f"{label} ...", flush=True)
        try:
            raw[label] = run_variant(kind, scheme, mode, batch_sizes, iters)
        except Exception as exc:  # a refusal or a backend failure is a result, not a crash
            refused[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"  {refused[label]}", flush=True)
        else:
            add_rows(kind, scheme, mode, raw[label])
        save()
    save()
    print("\n" + render(rows, refused, device))
    print(f"wrote benchmarks/results/{name}.md (+ .json) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
