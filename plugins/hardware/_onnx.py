"""``hardware.runtime: onnxruntime``: the model's forward pass executed by ONNX Runtime instead of torch.

At start-up (in the worker, after spawn) the loaded fp32 ``model.module`` is exported with
``torch.onnx`` into the persistent cache folder (``hardware.compile_cache_dir``/onnx, next to the
compile cache), keyed by the model's identity (weights fingerprint included), the opset, the torch
and onnxruntime versions and the int8 recipe, so a second start only opens the file. The session runs
with every graph optimization; on a GPU the TensorRT and CUDA providers come first where installed.

``model.module`` is then replaced by ``OrtModule``, a callable taking the same tensors as the torch
module and returning torch tensors, so the model plugin's ``preprocess`` / ``forward`` /
``postprocess`` stay as they are. Before the worker reports ready, a quality gate compares the ONNX
outputs with the torch module's on the model's calibration items (``ModelPlugin.quality``, e.g.
cosine) and refuses to start below ``hardware.onnx_min_quality``.

int8 (``hardware.onnx_int8: true``): ONNX Runtime's dynamic quantization (int8 weights, activations
quantized per call) on the exported graph; per-channel weight scales, only matmuls whose second input
is a weight (the attention score matmuls of two activations stay fp32), and the layers named in
``hardware.onnx_int8_exclude`` (fnmatch patterns over ONNX node names) kept in fp32.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from framework import ModelPlugin

log = logging.getLogger("hydraserve.hardware")

RUNTIMES = ("torch", "onnxruntime")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Bump when the export recipe changes (input naming, dynamic axes, quantization options): old files
# are then never opened again.
EXPORT_VERSION = 1


class OnnxQualityError(RuntimeError):
    """The ONNX Runtime outputs disagree with torch's more than ``hardware.onnx_min_quality`` allows."""


def missing_packages() -> list[str]:
    """The packages ``runtime=onnxruntime`` needs that are not installed (checked before any start)."""
    import importlib.util

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return [name for name in ("onnxruntime", "onnx") if not found(name)]


class OrtModule:
    """Calls an ``onnxruntime.InferenceSession`` like the torch module it was exported from."""

    def __init__(self, session: Any, input_names: list[str], output_names: list[str], device: str):
        self.session = session
        self.input_names = input_names
        self.output_names = output_names
        self.device = device

    def __call__(self, *tensors: Any) -> Any:
        import torch

        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors, strict=True)}
        outs = self.session.run(self.output_names, feeds)
        # ORT hands back fresh numpy arrays: wrapping them is free (no copy) on the CPU
        result = [torch.from_numpy(o) for o in outs]
        if not self.device.startswith("cpu"):
            result = [r.to(self.device) for r in result]
        return result[0] if len(result) == 1 else tuple(result)

    def eval(self) -> OrtModule:  # callers that treat ``model.module`` as an nn.Module
        return self

    def parameters(self) -> list:
        return []


def _tensors(batch: Any) -> tuple:
    import torch

    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    raise TypeError(f"hardware.runtime=onnxruntime needs the model's preprocess to return a tensor or a tuple "
                    f"of tensors (what the module is called with), got {type(batch).__name__}; use "
                    "hardware.runtime=torch for this model")


def cache_key(model: ModelPlugin, inputs: tuple, opset: int, int8: bool, exclude: list[str]) -> str:
    import onnxruntime
    import torch

    payload = {"v": EXPORT_VERSION, "model": model.identity(), "plugin": type(model).__name__,
               "inputs": [[str(t.dtype), t.dim()] for t in inputs], "opset": opset,
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "int8": {"per_channel": True, "exclude": sorted(exclude)} if int8 else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename: a second worker exporting at the same time never reads a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def export(module: Any, inputs: tuple, path: Path, opset: int) -> tuple[list[str], list[str]]:
    """``torch.onnx.export`` with every dimension of every input dynamic (batch and sequence buckets
    share one file). The TorchScript-based exporter: it needs only the ``onnx`` package (the dynamo
    one also needs onnxscript) and exports MiniLM in a few seconds."""
    import torch

    names = [f"input_{i}" for i in range(len(inputs))]
    with torch.inference_mode():
        out = module(*inputs)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    out_names = [f"output_{i}" for i in range(len(outs))]
    axes = {n: {d: f"{n}_d{d}" for d in range(t.dim())} for n, t in zip(names, inputs, strict=True)}
    axes.update({n: {d: f"{n}_d{d}" for d in range(t.dim())} for n, t in zip(out_names, outs, strict=True)})

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the quality gate is the check
            torch.onnx.export(module, inputs, str(tmp), input_names=names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)

    _atomic_write(path, write)
    return names, out_names


def quantize_int8(source: Path, path: Path, exclude: list[str]) -> dict:
    """ORT dynamic int8 of ``source`` into ``path``: per-channel weights, weight matmuls only."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    candidates = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    kept = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in exclude)]

    def write(tmp: Path) -> None:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=kept,
                         extra_options={"MatMulConstBOnly": True})

    _atomic_write(path, write)
    return {"int8_layers": len(candidates) - len(kept), "fp32_layers": kept}


def providers(device: str, requested: list[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        return list(requested)
    gpu = [p for p in GPU_PROVIDERS if p in available] if str(device).startswith("cuda") else []
    return [*gpu, "CPUExecutionProvider"]


def open_session(path: Path, provider_list: list[str], threads: int | None, spinning: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1  # sequential execution: a second pool would only add idle threads
    # Spinning threads answer the next op a few microseconds sooner, but burn the core a neighbour (the
    # API process, another worker) needs between requests.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=provider_list)


def gate(model: ModelPlugin, reference: Any, candidate: Any, floor: float | None) -> dict | None:
    """Calibration items through the torch ``reference`` and the ORT ``candidate``; ``model.quality``."""
    items = list(model.calibration_items() or [])
    if not items:
        return None

    def run(module: Any) -> Any:
        model.module = module
        return model.forward(model.preprocess(items))

    try:
        ref_out, cand_out = run(reference), run(candidate)
    finally:
        model.module = candidate
    quality = model.quality(ref_out, cand_out) or None
    value = None
    for key in ("min", "value", "mean"):
        if quality and isinstance(quality.get(key), (int, float)):
            value = float(quality[key])
            break
    if floor is not None and value is not None and value < floor:
        metric = (quality or {}).get("metric", "quality")
        raise OnnxQualityError(
            f"quality gate failed for hardware.runtime=onnxruntime: worst calibration {metric} of the ONNX "
            f"Runtime outputs to torch's is {value:.4f}, below hardware.onnx_min_quality={floor}. Keep more "
            "layers in fp32 (hardware.onnx_int8_exclude=[...]), set hardware.onnx_int8=false, use "
            "hardware.runtime=torch, or lower hardware.onnx_min_quality if this is acceptable.")
    return quality


def prepare(model: ModelPlugin, device: str, cfg: Any, batch: Any) -> dict:
    """Export (or find) the ONNX file, open its session, gate it, and put it in ``model.module``."""
    import onnxruntime

    inputs = _tensors(batch)
    root = Path(cfg.compile_cache_dir).expanduser() if cfg.compile_cache_dir else Path.home() / ".cache" / "hydraserve"
    folder = root / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    exclude = list(cfg.onnx_int8_exclude or [])
    key = cache_key(model, inputs, cfg.onnx_opset, cfg.onnx_int8, exclude)
    fp32_path = folder / f"{cache_key(model, inputs, cfg.onnx_opset, False, [])}.onnx"
    path = folder / f"{key}.onnx"
    report: dict = {"path": str(path), "opset": cfg.onnx_opset, "onnxruntime": onnxruntime.__version__,
                    "int8": bool(cfg.onnx_int8), "cached": path.exists()}
    t = time.perf_counter()
    if not fp32_path.exists():
        export(model.module, inputs, fp32_path, cfg.onnx_opset)
    if cfg.onnx_int8 and not path.exists():
        meta = quantize_int8(fp32_path, path, exclude)
        (folder / f"{key}.json").write_text(json.dumps(meta))
    if cfg.onnx_int8:
        with contextlib.suppress(OSError, ValueError):
            report.update(json.loads((folder / f"{key}.json").read_text()))
    report["export_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
    names = [f"input_{i}" for i in range(len(inputs))]
    t = time.perf_counter()
    plist = providers(device, cfg.onnx_providers)
    session = open_session(path, plist, cfg.threads, cfg.spin_wait)
    out_names = [o.name for o in session.get_outputs()]
    report["session_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
    report["providers"] = session.get_providers()
    reference = model.module
    candidate = OrtModule(session, names, out_names, str(device))
    t = time.perf_counter()
    report["quality"] = gate(model, reference, candidate, cfg.onnx_min_quality)
    report["gate_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
    # the torch weights are no longer needed: ORT holds its own copy
    del reference
    log.info("onnxruntime ready: %s, providers %s, quality %s", path.name, report["providers"], report["quality"])
    return report
