"""What the quantization plugins share: the common Config fields, which scheme runs on which hardware,
module selection (skip patterns), dtype casts with boundary conversions, and ``quantize_`` with a summary.

One table (``_SUPPORT``) says where each built-in scheme runs, so that a refusal can list the schemes
that *do* work on the same hardware. The rules come from what torchao 0.18 actually does here:

* ``Int4WeightOnlyConfig`` has no CPU layout in 0.18: ``tile_packed_to_4d`` (tinygemm) needs CUDA and
  bfloat16, ``plain``/``preshuffled`` need the ``mslk`` CUDA kernels, ``plain_int32`` is XPU/NPU only
  (each fails on CPU with ImportError / AssertionError / NotImplementedError).
* ``Float8DynamicActivationFloat8WeightConfig`` asserts CUDA compute capability >= 8.9 (or MI300/XPU).
* torchao's int8 schemes run on CPU, but eager they are *slower* than fp32 (each call quantizes
  activations / dequantizes weights through tensor-subclass dispatch); compiled, int8 dynamic is
  several times faster than fp32 eager. ``check`` refuses them with ``hardware.compile=off`` on the
  CPU unless ``allow_slow``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from framework import CheckContext, HardwareInfo, QuantizationPlugin

log = logging.getLogger("hydraserve.quantization")

# Final layers that decide the answer (classifier heads, LM heads, ResNet's fc): kept in full precision.
DEFAULT_SKIP = ["lm_head", "*.lm_head", "classifier", "*.classifier", "fc", "head"]


@dataclass
class QuantConfig:
    """Fields every built-in scheme has (each scheme's Config subclasses this and sets its defaults)."""

    # fnmatch patterns on dotted module names (``encoder.layer.0.output.dense``); a module whose name or
    # any parent's name matches stays in full precision.
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    # module class names kept in full precision (e.g. ``LayerNorm``); embeddings are never quantized
    # by the int schemes (torchao rewrites only ``nn.Linear``).
    skip_types: list[str] = field(default_factory=list)
    # the quality gate's floor: the worst calibration item's agreement with fp32 (cosine for the
    # built-in models). The worker refuses to start below it. null disables the gate.
    min_quality: float | None = 0.99
    # run a combination that is known to be slower than fp32 on this hardware anyway
    allow_slow: bool = False
    # optional JSON / JSONL file of request bodies used as extra calibration inputs for the gate
    calibration_file: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.min_quality is not None and not -1.0 <= self.min_quality <= 1.0:
            out.append(("min_quality", f"must be within [-1, 1] (cosine) or null, got {self.min_quality}"))
        if self.calibration_file is not None:
            from pathlib import Path

            if not Path(self.calibration_file).expanduser().is_file():
                out.append(("calibration_file", f"no such file: {self.calibration_file}; give a JSON list "
                            "of request bodies or a JSONL file with one request body per line"))
        return out


# --------------------------------------------------------------------------------- hardware support
def _cc(info: HardwareInfo) -> tuple[int, int]:
    return tuple(info.cuda_capability or (0, 0))  # type: ignore[return-value]


def _none(info: HardwareInfo) -> str | None:
    return None


def _bf16(info: HardwareInfo) -> str | None:
    if info.accelerator == "cuda" and _cc(info) < (8, 0):
        return "bfloat16 needs compute capability >= 8.0 (Ampere or newer)"
    if info.accelerator == "cpu" and info.extra.get("native_bf16") is False:
        return "this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), so bf16 matmuls are emulated"
    return None


def _fp16(info: HardwareInfo) -> str | None:
    if info.accelerator == "cpu":
        return "float16 matmuls on the CPU are emulated (slow) and lose range; fp16 is for GPUs"
    return None


def _int8(info: HardwareInfo) -> str | None:
    if info.accelerator not in ("cpu", "cuda"):
        return f"torchao's int8 kernels run on cpu and cuda, not {info.accelerator}"
    return None


def _int4(info: HardwareInfo) -> str | None:
    if info.accelerator == "cpu":
        return ("torchao 0.18's Int4WeightOnlyConfig has no CPU layout (tile_packed_to_4d needs CUDA, "
                "plain/preshuffled need the mslk CUDA kernels, plain_int32 is XPU/NPU only)")
    if info.accelerator != "cuda":
        return f"int4 weight-only kernels need CUDA, not {info.accelerator}"
    if _cc(info) < (8, 0):
        return "the int4 tinygemm kernel needs compute capability >= 8.0 (bfloat16)"
    return None


def _float8(info: HardwareInfo) -> str | None:
    if info.accelerator != "cuda":
        return "float8 matmuls need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer)"
    if _cc(info) < (8, 9):
        return "float8 matmuls need compute capability >= 8.9 (Ada, Hopper or newer)"
    return None


_SUPPORT: dict[str, Callable[[HardwareInfo], str | None]] = {
    "none": _none,
    "bf16": _bf16,
    "fp16": _fp16,
    "int8_weight_only": _int8,
    "int8_dynamic": _int8,
    "int4_weight_only": _int4,
    "float8_dynamic": _float8,
}

# Slower than fp32 eager on the CPU with torchao 0.18, measured with all-MiniLM-L6-v2 at batch 1 and 8
# (benchmarks/quantization.py): both int8 schemes only pay off compiled.
_SLOW_ON_CPU_EAGER = {
    "int8_dynamic": "eager it is ~2x slower than fp32; compiled it is several times faster",
    "int8_weight_only": "eager it dequantizes the weights on every call (~1.3x slower than fp32)",
}


def describe_hardware(info: HardwareInfo) -> str:
    if info.accelerator == "cuda" and info.cuda_capability:
        major, minor = info.cuda_capability
        return f"cuda ({info.device_name or 'GPU'}, compute capability {major}.{minor})"
    return f"{info.accelerator} ({info.device_name})" if info.device_name else info.accelerator


def supported_schemes(info: HardwareInfo) -> list[str]:
    return [name for name, rule in _SUPPORT.items() if rule(info) is None]


def support_problem(scheme: str, info: HardwareInfo) -> str | None:
    """Why ``scheme`` cannot run on ``info`` (naming the schemes that can), or ``None``."""
    rule = _SUPPORT.get(scheme)
    reason = rule(info) if rule is not None else None
    if reason is None:
        return None
    return (f"quantization={scheme} cannot run on {describe_hardware(info)}: {reason}. "
            f"Schemes that run there: {', '.join(supported_schemes(info))}")


def check_scheme(scheme: str, plugin: QuantizationPlugin, ctx: CheckContext) -> list[str]:
    """The shared ``check``: hardware support, then known-slow combinations."""
    if ctx.hardware is None:
        return []
    info = ctx.hardware.info()
    if not info.available:
        return []  # the hardware plugin reports a missing device itself
    problem = support_problem(scheme, info)
    if problem is not None:
        return [problem]
    compile_mode = str(getattr(ctx.hardware.config, "compile", "off"))
    if (info.accelerator == "cpu" and scheme in _SLOW_ON_CPU_EAGER and compile_mode == "off"
            and not plugin.config.allow_slow):
        return [f"quantization={scheme} with hardware.compile=off is slower than fp32 on cpu "
                f"({_SLOW_ON_CPU_EAGER[scheme]}); set hardware.compile=auto or default "
                "(or use experiment=cpu_low_latency), or quantization.allow_slow=true to run it eager anyway"]
    return []


def device_info(device: str) -> HardwareInfo:
    """HardwareInfo for a concrete device string (``cpu``, ``cuda``, ``cuda:1``), for ``apply``'s own check."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return HardwareInfo("cuda", True, torch.cuda.get_device_capability(index),
                            torch.cuda.get_device_name(index))
    return HardwareInfo(dev.type, True)


def require_support(scheme: str, device: str) -> None:
    problem = support_problem(scheme, device_info(device))
    if problem is not None:
        raise RuntimeError(problem)


# ------------------------------------------------------------------------------ module selection
def is_skipped(name: str, module: Any, cfg: QuantConfig) -> bool:
    if type(module).__name__ in cfg.skip_types:
        return True
    parts = name.split(".") if name else []
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in cfg.skip)


# ------------------------------------------------------------------------------------------ casts
def _convert(value: Any, dtype: Any) -> Any:
    """Cast every floating-point tensor inside ``value`` (tensors, tuples, lists, dicts) to ``dtype``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_convert(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, dtype) for v in value)
    if isinstance(value, dict):
        for key in list(value.keys()):  # in place: keeps ModelOutput and other dict subclasses intact
            value[key] = _convert(value[key], dtype)
        return value
    return value


def cast_io_module(inner: Any, dtype: Any) -> Any:
    """Wrap ``inner`` so callers keep sending and receiving float32 while it computes in ``dtype``."""
    import torch

    class CastIO(torch.nn.Module):
        """Float inputs -> ``dtype`` on the way in, float outputs -> float32 on the way out."""

        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.inner = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = self.inner(*_convert(args, dtype), **_convert(kwargs, dtype))
            return _convert(out, torch.float32)

    return CastIO(inner)


def cast_module(module: Any, dtype: Any, cfg: QuantConfig) -> tuple[Any, list[str]]:
    """Cast ``module`` to ``dtype``, keeping skipped sub-modules in float32 with boundary casts.

    Returns the wrapped module (float32 in, float32 out) and the names kept in float32.
    """
    import torch

    module.to(dtype)
    kept = []
    for name, sub in module.named_modules():
        if not name or not is_skipped(name, sub, cfg):
            continue
        if any(name.startswith(k + ".") for k in kept):
            continue  # its parent already converts at the boundary
        sub.to(torch.float32)
        sub.register_forward_pre_hook(
            lambda _m, args, kwargs: (_convert(args, torch.float32), _convert(kwargs, torch.float32)),
            with_kwargs=True)
        sub.register_forward_hook(lambda _m, _args, out: _convert(out, dtype))
        kept.append(name)
    return cast_io_module(module, dtype), kept


# ------------------------------------------------------------------------------------ quantize_
def quantize_linears(module: Any, ao_config: Any, cfg: QuantConfig,
                     compatible: Callable[[Any], bool] | None = None) -> dict:
    """``torchao.quantization.quantize_`` on every ``nn.Linear`` not skipped; returns a summary."""
    import torch
    from torchao.quantization import quantize_

    quantized: list[str] = []
    kept: list[str] = []

    def select(mod: Any, fqn: str) -> bool:
        if not isinstance(mod, torch.nn.Linear):
            return False
        if is_skipped(fqn, mod, cfg) or (compatible is not None and not compatible(mod)):
            kept.append(fqn)
            return False
        quantized.append(fqn)
        return True

    quantize_(module, ao_config, filter_fn=select)
    if not quantized:
        log.warning("%s quantized no linear layer (all %d skipped or incompatible)",
                    type(ao_config).__name__, len(kept))
    return {"quantized_linears": len(quantized), "kept_full_precision": kept}


class SchemePlugin(QuantizationPlugin):
    """Base of the built-in schemes: ``scheme`` names the entry in the support table."""

    def check(self, ctx: CheckContext) -> list[str]:
        return check_scheme(self.scheme, self, ctx)

    def apply(self, module: Any, device: str) -> Any:
        require_support(self.scheme, device)
        module, summary = self.rewrite(module, device)
        self.summary = {"scheme": self.scheme, **summary}
        log.info("quantization %s: %s", self.scheme, self.summary)
        return module

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        raise NotImplementedError

    def describe(self) -> dict:
        out = super().describe()
        if self.summary:
            out["applied"] = {k: v for k, v in self.summary.items() if k != "kept_full_precision"}
        return out


def choice_problems(field: str, value: str, choices: tuple[str, ...]) -> list[tuple[str, str]]:
    """The config problem for a value outside ``choices`` (e.g. a scheme's granularity)."""
    if value in choices:
        return []
    return [(field, f"must be one of {', '.join(choices)}, got '{value}'")]
