"""A worker's start-up sequence: load -> quantize -> quality gate -> compile + warm-up.

``prepare_model`` is the one place where the model, quantization and hardware plugins meet inside an
inference worker. It refuses to start a model whose quantized outputs disagree with the full-precision
ones (``QualityGateError``), and returns a report (quality and timings) for the logs and ``/info``.

Example::

    report = prepare_model(resolved.model, resolved.quantization, resolved.hardware, "cpu",
                           warmup_batch_sizes(resolved.hardware, resolved.batching.max_batch_size))

Batches are padded to the hardware's buckets by the worker loop::

    size = hardware.pad_batch_size(len(items))
    outputs = model.postprocess(model.forward(model.preprocess(pad_items(items, size))))[: len(items)]
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from framework.plugin import HardwarePlugin, ModelPlugin, QuantizationPlugin

log = logging.getLogger("hydraserve.engine")

CALIBRATION_CHUNK = 32  # items per gate forward pass: bounds memory for large calibration files


class QualityGateError(RuntimeError):
    """The quantized model disagrees with the full-precision one more than ``min_quality`` allows."""

    def __init__(self, scheme: str, measured: float, min_quality: float, quality: dict):
        self.scheme = scheme
        self.measured = measured
        self.min_quality = min_quality
        self.quality = quality
        metric = quality.get("metric", "quality")
        super().__init__(
            f"quality gate failed for quantization={scheme}: worst calibration {metric} to the "
            f"full-precision model is {measured:.4f}, below quantization.min_quality={min_quality}. "
            f"Use a more precise scheme (e.g. quantization=bf16 or none), keep sensitive layers in full "
            f"precision (quantization.skip=[...]), or lower quantization.min_quality if this is acceptable.")


def pad_items(items: list[Any], target: int) -> list[Any]:
    """Pad a batch to ``target`` items by repeating the last item (real data: no NaN/empty-input paths).

    The caller keeps only the first ``len(items)`` outputs. Returns ``items`` itself when no padding
    is needed.
    """
    if target <= len(items) or not items:
        return items
    return list(items) + [items[-1]] * (target - len(items))


def warmup_batch_sizes(hardware: HardwarePlugin, max_batch_size: int) -> list[int]:
    """The padded batch sizes a worker serving batches of 1..``max_batch_size`` items will run."""
    return sorted({hardware.pad_batch_size(n) for n in range(1, max(1, int(max_batch_size)) + 1)})


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _now() -> float:
    return time.perf_counter()


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)


def _calibration_file_items(model: ModelPlugin, path: str) -> list[Any]:
    """Request bodies from a JSON list or a JSONL file, decoded by the model like real requests."""
    text = Path(path).expanduser().read_text()
    try:
        if text.lstrip().startswith("["):
            bodies = json.loads(text)
        else:
            bodies = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"quantization.calibration_file: {path} is not JSON / JSONL ({exc})") from exc
    items: list[Any] = []
    for i, body in enumerate(bodies):
        try:
            items.extend(model.decode(body))
        except Exception as exc:
            raise ValueError(f"quantization.calibration_file: request {i} of {path} is not a valid request "
                             f"for this model: {exc}") from exc
    return items


def _join(outs: list[Any]) -> Any:
    """Join per-chunk outputs: tensors along dim 0, tuples/dicts field by field, lists as item lists."""
    import torch

    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0)
    if isinstance(first, tuple):  # a structure, e.g. (embeddings, token counts)
        return tuple(_join([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _join([o[k] for o in outs]) for k in first}
    return [x for o in outs for x in o]  # a list holds one entry per item


def _run(model: ModelPlugin, items: list[Any]) -> Any:
    """Forward ``items`` in chunks and join the outputs along the batch dimension."""
    outs = [model.forward(model.preprocess(items[i:i + CALIBRATION_CHUNK]))
            for i in range(0, len(items), CALIBRATION_CHUNK)]
    return outs[0] if len(outs) == 1 else _join(outs)


def _gate_value(quality: dict) -> float | None:
    for key in ("min", "value", "mean"):
        if isinstance(quality.get(key), (int, float)):
            return float(quality[key])
    return None


def quality_gate(model: ModelPlugin, reference: Any, quantization: QuantizationPlugin) -> dict:
    """Compare the rewritten ``model.module`` with ``reference`` on the calibration items.

    Returns ``{"quality": {...} | None, "quality_gate": "passed" | "skipped: ..."}``; raises
    ``QualityGateError`` when the measured value is below ``quantization.min_quality``.
    """
    items = list(model.calibration_items() or [])
    path = quantization.calibration_file
    if path:
        items += _calibration_file_items(model, path)
    if not items:
        return {"quality": None, "quality_gate": "skipped: the model has no calibration items"}
    candidate_out = _run(model, items)
    quantized = model.module
    model.module = reference
    try:
        reference_out = _run(model, items)
    finally:
        model.module = quantized
    quality = model.quality(reference_out, candidate_out) or {}
    value = _gate_value(quality)
    floor = quantization.min_quality
    if value is None:
        return {"quality": quality or None, "quality_gate": "skipped: the model defines no quality measure"}
    if floor is not None and value < floor:
        raise QualityGateError(quantization.scheme_name, value, floor, quality)
    return {"quality": quality, "quality_gate": "passed" if floor is not None else "measured (no floor)"}


def prepare_model(model: ModelPlugin, quantization: QuantizationPlugin, hardware: HardwarePlugin, device: str,
                  batch_sizes: list[int] | None = None) -> dict:
    """Run the whole worker start-up sequence; ``model.module`` ends quantized, compiled and warm.

    1. ``hardware.setup_process()`` (threads, compile cache), 2. ``model.load(device)``,
    3. keep a full-precision copy (only when the scheme changes numbers), 4. ``quantization.apply``,
    5. the quality gate against the copy, 6. free the copy, 7. ``hardware.optimize`` (compile + warm-up
    over ``batch_sizes``, default ``[1]``).

    Returns ``{"device", "quantization", "quality", "quality_gate", "min_quality", "compile_mode",
    "cuda_graphs", "warmup_batch_sizes", "setup_ms", "load_ms", "quantize_ms", "gate_ms", "compile_ms",
    "warmup_ms", "startup_ms", "quantization_summary"}``.
    """
    started = _now()
    scheme = quantization.scheme_name
    report: dict = {"device": str(device), "quantization": scheme, "min_quality": quantization.min_quality}

    t = _now()
    hardware.setup_process()
    report["setup_ms"] = _ms(t)

    t = _now()
    model.load(device)
    _sync(device)
    report["load_ms"] = _ms(t)

    identity = quantization.is_identity() or model.module is None
    reference = None if identity else copy.deepcopy(model.module)

    t = _now()
    if model.module is not None:
        try:
            model.module = quantization.apply(model.module, device)
        except Exception as exc:
            raise RuntimeError(f"quantization={scheme} failed to rewrite the model on {device}: "
                               f"{type(exc).__name__}: {exc}") from exc
    _sync(device)
    report["quantize_ms"] = _ms(t)
    report["quantization_summary"] = dict(quantization.summary or {})

    t = _now()
    if reference is None:
        report.update(quality=None, quality_gate="not needed: quantization leaves the numbers as loaded")
    else:
        try:
            report.update(quality_gate(model, reference, quantization))
        finally:
            del reference
            gc.collect()
            if str(device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
    report["gate_ms"] = _ms(t)

    engine = hardware.optimize(model, device, list(batch_sizes or [1]))
    engine = engine if isinstance(engine, dict) else {}
    report["compile_mode"] = engine.get("compile_mode", "off")
    report["cuda_graphs"] = bool(engine.get("cuda_graphs", False))
    report["warmup_batch_sizes"] = engine.get("warmup_batch_sizes", [])
    report["compile_ms"] = round(float(engine.get("compile_ms", 0.0)), 1)
    report["warmup_ms"] = round(float(engine.get("warmup_ms", 0.0)), 1)
    # whatever else the hardware reports (its runtime, an export's details) reaches /info as well
    report.update({k: v for k, v in engine.items() if k not in report})
    report["startup_ms"] = _ms(started)
    log.info("model ready on %s: quantization=%s quality=%s compile=%s start-up %.0f ms", device, scheme,
             report["quality"], report["compile_mode"], report["startup_ms"])
    return report
