"""What the cpu, cuda and auto hardware plugins share: the execution engine of a worker.

Threads, torch.compile (mode, dynamic shapes, CUDA graphs), a persistent compile cache so a restart
does not recompile, batch-size buckets (shape bucketing, so compiled graphs are reused) and warm-up
over the bucketed shapes before the worker reports ready.

``compile: auto`` (the default) compiles when a quantization scheme rewrote the weights: torchao
tensor subclasses (whose eager dispatch is slower than fp32; their compiled kernels are the point of
quantizing) or reduced-precision casts (bf16 on the CPU: 1.2x eager, 1.8x compiled vs fp32 for MiniLM),
or when CUDA graphs are asked for. The fp32 reference stays eager: it starts in seconds.

``runtime: onnxruntime`` runs the forward pass in ONNX Runtime instead (``_onnx.py``): the fp32 model is
exported once into the same persistent cache folder and gated against torch's outputs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import CheckContext, GenerativeModelPlugin, HardwareInfo, HardwarePlugin, ModelPlugin
from plugins.hardware import _onnx

log = logging.getLogger("hydraserve.hardware")

COMPILE_MODES = ("off", "auto", "default", "max-autotune", "reduce-overhead")
_OFF_ALIASES = {"false", "no", "none", "0"}  # YAML 1.1 reads a bare `off` as false
_ON_ALIASES = {"true", "yes", "on", "1"}
# Each distinct input shape may cost dynamo a recompile; buckets keep their number small, but the
# default limit (8) would silently fall back to eager after batch buckets x sequence buckets shapes.
RECOMPILE_LIMIT = 64
# GOMP_SPINCOUNT of a generative model's worker (hardware.spin_count null): libgomp's own default when no
# wait policy is set, ~3 ms. It bridges decode's gaps between parallel regions (SmolLM2 on vLLM, one start
# each in the same minutes: ITL 50.2 ms at 300000, 43.0 at 1000000, 48.5 with OMP_WAIT_POLICY=ACTIVE, against
# 81-85 at 0), and an idle server's threads sleep 3 ms after its last step (ACTIVE kept a core busy while idle).
GENERATION_SPIN_COUNT = 300_000


@dataclass
class EngineConfig:
    devices: int | None = None  # None: all visible devices of the accelerator (cpu: one)
    workers_per_device: int = 1
    threads: int | None = None  # torch intra-op threads per worker (CPU); None: torch's default
    warmup: bool = True  # run every batch bucket once at start-up (compiles before the first request)
    compile: str = "auto"  # off | auto (compile quantized models) | default | max-autotune | reduce-overhead
    compile_dynamic: bool | None = None  # torch.compile(dynamic=...); None: static first, dynamic on change
    cuda_graphs: bool = False  # CUDA graphs through torch.compile (GPU only)
    cpp_wrapper: bool = False  # inductor calls its kernels from generated C++, not Python (CPU: less per-call
    #                            overhead at small batches; compiling each graph takes several times longer)
    compile_cache_dir: str | None = "~/.cache/hydraserve/compile"  # persistent inductor cache; None: torch's
    batch_buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # pad batches up to these
    runtime: str = "torch"  # torch | onnxruntime (export at start-up, run in ONNX Runtime; see _onnx.py)
    onnx_opset: int = 17  # ONNX opset of the export (part of the export cache key)
    onnx_int8: bool = False  # ONNX Runtime dynamic int8 (per-channel weights), gated by onnx_min_quality
    onnx_int8_exclude: list[str] = field(default_factory=list)  # fnmatch patterns of ONNX node names kept fp32
    onnx_min_quality: float | None = 0.99  # worst calibration quality (cosine) of ORT vs torch outputs
    onnx_providers: list[str] | None = None  # None: TensorRT, CUDA (on a GPU, where installed), then CPU
    # Intra-op threads waiting for work spin without bound (OpenMP ACTIVE: for minutes, even on an idle
    # server; ORT allow_spinning) or sleep after spin_count polls (false): when another process shares the
    # cores a spinning thread burns the time slice its peer needs and every parallel region waits for it
    # (MiniLM fp32, 2 threads, load ~6: 395 ms spinning against 44 ms passive; results/e2e_latency.md).
    spin_wait: bool = False
    # With spin_wait false: how many times an idle OpenMP thread polls for work before it sleeps (libgomp's
    # GOMP_SPINCOUNT; about 1 ms per 100000). null (default): 0 for a one-shot model, GENERATION_SPIN_COUNT
    # (~3 ms) for a generative one. 0 sleeps at once, and on a VM every parallel region then waits for a
    # sleeping vCPU to be woken: on the quiet 2-core VM MiniLM's forward took 28.3 ms at 0 and 14.7 ms at
    # 30000, but beside a busy neighbour 23.3 ms at 0 and 130.5 ms at 30000 (results/e2e_latency_spin*.md).
    # Decode is a loop of many small parallel regions that keeps the cores busy for the whole reply, and
    # a pool that sleeps at once is woken for each: SmolLM2 on vLLM had ITL 81-85 ms at 0 (docs/vllm.md).
    spin_count: int | None = None
    # Eager CPU models: their float32 Linear layers run on oneDNN with the weights packed once
    # (plugins/model/_packed_linear.py). SmolLM2 served: decode ITL 0.59x and 16-stream tokens/s 1.7x
    # (results/generation_native_vs_vllm.md); MiniLM served 1.68-1.89x the req/s at saturation
    # (results/packed_weights.md), p50 10.4 vs 11.8 ms at concurrency 1 (results/e2e_latency_packed.md).
    # Quantized weights, GPU weights and compiled graphs are never packed.
    packed_weights: bool = True

    def __post_init__(self) -> None:
        value = str(self.compile).strip()
        if value.lower() in _OFF_ALIASES:
            value = "off"
        elif value.lower() in _ON_ALIASES:
            value = "default"
        self.compile = value

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.workers_per_device < 1:
            out.append(("workers_per_device", f"must be >= 1, got {self.workers_per_device}"))
        if self.threads is not None and self.threads < 1:
            out.append(("threads", f"must be >= 1 or null, got {self.threads}"))
        if self.spin_count is not None and self.spin_count < 0:
            out.append(("spin_count", f"must be >= 0 or null (0: sleep at once), got {self.spin_count}"))
        if self.devices is not None and self.devices < 1:
            out.append(("devices", f"must be >= 1 or null, got {self.devices}"))
        if self.compile not in COMPILE_MODES:
            out.append(("compile", f"must be one of {', '.join(COMPILE_MODES)}, got '{self.compile}'"))
        if self.cuda_graphs and self.compile == "off":
            out.append(("cuda_graphs", "CUDA graphs are captured through torch.compile; set hardware.compile="
                        "auto or default (or cuda_graphs=false)"))
        if self.cpp_wrapper and self.compile == "off":
            out.append(("cpp_wrapper", "the C++ wrapper is part of torch.compile's generated code; set "
                        "hardware.compile=auto or default (or cpp_wrapper=false)"))
        buckets = list(self.batch_buckets)
        if any(b < 1 for b in buckets) or sorted(set(buckets)) != buckets:
            out.append(("batch_buckets", f"must be strictly increasing positive sizes (e.g. [1, 2, 4, 8]), "
                        f"got {buckets}"))
        out += self._runtime_problems()
        if self.compile_cache_dir is not None:
            path = Path(self.compile_cache_dir).expanduser()
            if path.exists() and not path.is_dir():
                out.append(("compile_cache_dir", f"{self.compile_cache_dir} exists and is not a folder"))
        return out

    def _runtime_problems(self) -> list[tuple[str, str]]:
        out = []
        if self.runtime not in _onnx.RUNTIMES:
            return [("runtime", f"must be one of {', '.join(_onnx.RUNTIMES)}, got '{self.runtime}'")]
        if self.runtime == "torch":
            for name in ("onnx_int8", "onnx_int8_exclude", "onnx_providers"):
                if getattr(self, name):
                    out.append((name, "only applies with hardware.runtime=onnxruntime; set hardware.runtime="
                                "onnxruntime or leave it unset"))
            return out
        if self.compile not in ("off", "auto"):
            out.append(("compile", f"torch.compile does not run under hardware.runtime=onnxruntime (ONNX Runtime "
                        f"optimizes the exported graph itself), got '{self.compile}'; set hardware.compile=auto "
                        "or off, or hardware.runtime=torch"))
        for name in ("cuda_graphs", "cpp_wrapper"):
            if getattr(self, name):
                out.append((name, f"a torch.compile setting; hardware.runtime=onnxruntime does not use it: set "
                            f"hardware.{name}=false or hardware.runtime=torch"))
        if not 14 <= self.onnx_opset <= 21:
            out.append(("onnx_opset", f"must be between 14 and 21 (what torch.onnx exports), got {self.onnx_opset}"))
        if self.onnx_min_quality is not None and not 0 < self.onnx_min_quality <= 1:
            out.append(("onnx_min_quality", f"must be in (0, 1] or null, got {self.onnx_min_quality}"))
        return out


def cuda_info() -> HardwareInfo:
    import torch

    if not torch.cuda.is_available():
        return HardwareInfo("cuda", available=False)
    return HardwareInfo("cuda", available=True, cuda_capability=torch.cuda.get_device_capability(0),
                        device_name=torch.cuda.get_device_name(0))


@functools.lru_cache(maxsize=1)
def cpu_info() -> HardwareInfo:
    """The CPU's model name and the ISA features quantization cares about (from /proc/cpuinfo)."""
    name, flags = "", None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    extra: dict = {"cores": os.cpu_count()}
    if flags is not None:
        extra["native_bf16"] = bool(flags & {"avx512_bf16", "amx_bf16"})
        extra["int8_dot"] = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return HardwareInfo("cpu", available=True, device_name=name, extra=extra)


def is_rewritten(module: Any) -> bool:
    """True when some parameter is a tensor subclass (torchao's Int8Tensor, Float8Tensor, ...) or is
    stored in a reduced-precision float (bf16 / fp16 casts)."""
    if module is None:
        return False
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(is_traceable_wrapper_subclass(p) or p.dtype in (torch.bfloat16, torch.float16)
               for p in module.parameters())


# The variables apply_wait_policy manages, and the list of those it set in this environment: a process
# spawned after a validate (a server started by the bench, by a test, by a replica launcher) inherits them,
# and must not take its parent's setting for one the user exported.
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_SET_BY_US = "HYDRASERVE_OPENMP_SET"


def set_by_hydraserve() -> dict[str, str]:
    """The wait variables of this environment that a hydraserve validate set (not the user): what a
    process started from here without hydraserve's thread policy must leave out."""
    ours = os.environ.get(_SET_BY_US, "").split(",")
    return {name: os.environ[name] for name in _WAIT_VARIABLES if name in ours and name in os.environ}


def _exported_by_user(name: str) -> str | None:
    return None if name in set_by_hydraserve() else os.environ.get(name)


# What the user exported before the server started: it wins over hardware.spin_wait and spin_count.
_USER_WAIT_POLICY = _exported_by_user("OMP_WAIT_POLICY")
_USER_SPIN_COUNT = _exported_by_user("GOMP_SPINCOUNT")


def apply_wait_policy(spin: bool, spin_count: int | None = 0) -> None:
    """``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` for the worker processes this process will spawn
    (``hardware.spin_wait``, ``hardware.spin_count``). A spinning policy spins without bound, so the count
    only applies to the sleeping one; a variable the user exported is left as it is."""
    if _USER_WAIT_POLICY is None:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE" if spin else "PASSIVE"
    if _USER_SPIN_COUNT is None:
        if spin or spin_count is None:
            os.environ.pop("GOMP_SPINCOUNT", None)  # one process may validate several configs (tests, bench)
        else:
            os.environ["GOMP_SPINCOUNT"] = str(spin_count)
    user = {"OMP_WAIT_POLICY": _USER_WAIT_POLICY, "GOMP_SPINCOUNT": _USER_SPIN_COUNT}
    os.environ[_SET_BY_US] = ",".join(name for name in _WAIT_VARIABLES if user[name] is None)


class EngineHardware(HardwarePlugin):
    Config = EngineConfig

    def devices(self) -> int | str:
        return self.config.devices if self.config.devices is not None else "auto"

    def wait_policy(self, model: ModelPlugin | None) -> tuple[bool, int | None]:
        """``(spin, spin_count)`` for ``model``'s worker: ``spin_count`` null resolves by the model's kind."""
        count = self.config.spin_count
        if count is None:
            count = GENERATION_SPIN_COUNT if isinstance(model, GenerativeModelPlugin) else 0
        return bool(self.config.spin_wait), count

    # --- validation --------------------------------------------------------------------------
    def check(self, ctx: CheckContext) -> list[str]:
        # libgomp reads OMP_WAIT_POLICY once, when torch first loads it, and a worker imports torch while
        # it validates its config (hardware=auto asks torch for a GPU, below), before any hook of ours
        # runs: so the variable is set first thing here, when the server's main process validates (the
        # model is known by then), and the spawned workers inherit it.
        apply_wait_policy(*self.wait_policy(ctx.model))
        info = self.info()
        found = self._runtime_check(ctx)
        if info.accelerator != "cuda":
            where = f"hardware={self.config_name()} ({info.accelerator})"
            if self.config.cuda_graphs:
                found.append(f"cuda_graphs: CUDA graphs need a CUDA GPU and {where} has none; "
                             "set hardware.cuda_graphs=false or use hardware=cuda")
            if self.config.compile == "reduce-overhead":
                found.append(f"compile: reduce-overhead means CUDA graphs, which {where} cannot use; "
                             "use hardware.compile=default or max-autotune")
        return found

    def _runtime_check(self, ctx: CheckContext) -> list[str]:
        if self.config.runtime != "onnxruntime":
            return []
        found = []
        missing = _onnx.missing_packages()
        if missing:
            found.append(f"runtime: onnxruntime needs the package(s) {', '.join(missing)}, not installed here; "
                         "pip install 'hydraserve[onnx]' or set hardware.runtime=torch")
        q = ctx.quantization
        if q is not None and not q.is_identity():
            found.append(f"runtime: hardware.runtime=onnxruntime exports the fp32 model, and quantization="
                         f"{q.scheme_name} rewrites it into tensors torch.onnx cannot export; use quantization=none "
                         "(hardware.onnx_int8=true for ONNX Runtime's own int8) or hardware.runtime=torch")
        if isinstance(ctx.model, GenerativeModelPlugin):
            found.append("runtime: a generative model runs on the generation engine's torch forward; "
                         "hardware.runtime=onnxruntime serves one-shot models (embeddings, classifiers); "
                         "set hardware.runtime=torch")
        return found

    def numerics(self) -> dict:
        """What this engine does to the numbers besides quantization, for the response-cache scope
        (``framework.cache_key.cache_scope``): empty for torch (compiled or not, the same math)."""
        cfg = self.config
        if cfg.runtime == "torch":
            return {}
        return {"runtime": cfg.runtime, "onnx_int8": cfg.onnx_int8,
                "onnx_int8_exclude": sorted(cfg.onnx_int8_exclude) if cfg.onnx_int8 else []}

    def config_name(self) -> str:
        return type(self).__module__.rsplit(".", 1)[-1]

    # --- worker process ----------------------------------------------------------------------
    def setup_process(self) -> None:
        import torch

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.config.compile == "off":
            return  # nothing below matters without torch.compile (and importing dynamo costs seconds)
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = bool(self.config.cpp_wrapper)  # read when a graph is compiled
        if self.config.compile_cache_dir:
            root = Path(self.config.compile_cache_dir).expanduser().resolve()
            (root / "inductor").mkdir(parents=True, exist_ok=True)
            # read by inductor (and Triton) each time they look for compiled code: a restarted worker
            # finds the kernels and FX graphs of the previous run instead of recompiling them
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
            os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
            inductor_config.fx_graph_cache = True
            if hasattr(inductor_config, "autotune_local_cache"):
                inductor_config.autotune_local_cache = True
        import torch._dynamo.config as dynamo_config

        limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), RECOMPILE_LIMIT))

    def pad_batch_size(self, n: int) -> int:
        if getattr(self, "_eager", False):
            return n
        buckets = self.config.batch_buckets
        for bucket in buckets:
            if n <= bucket:
                return bucket
        if not buckets:
            return n
        # beyond the largest bucket: round up to a multiple of it, so the number of shapes stays small
        return -(-n // buckets[-1]) * buckets[-1]

    def compile_mode(self, module: Any) -> str | None:
        """The torch.compile mode this config resolves to for ``module``; ``None`` means eager."""
        requested = self.config.compile
        graphs = self.config.cuda_graphs or requested == "reduce-overhead"
        if requested == "off":
            return None
        if requested == "auto":
            if not (graphs or is_rewritten(module)):
                return None
            requested = "default"
        if requested == "max-autotune":
            return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if graphs else "default"

    def optimize(self, model: ModelPlugin, device: str, batch_sizes: list[int]) -> dict:
        """Compile ``model.module`` as configured and warm up over the padded batch sizes.

        Returns ``{"compile_mode", "cuda_graphs", "compile_ms", "warmup_ms", "warmup_batch_sizes"}``;
        ``compile_ms`` is the first warm-up pass (torch.compile is lazy: it compiles on first call).
        """
        if self.config.runtime == "onnxruntime":
            return self._optimize_onnx(model, device, batch_sizes)
        import torch

        mode = self.compile_mode(model.module)
        # Eager kernels take any shape: padding a batch up to a bucket would only add work.
        self._eager = mode is None
        graphs = mode in ("reduce-overhead", "max-autotune")
        report: dict = {"runtime": "torch", "compile": self.config.compile, "compile_mode": mode or "off",
                        "cuda_graphs": graphs,
                        "compile_ms": 0.0, "warmup_ms": 0.0, "warmup_batch_sizes": []}
        if mode is not None and model.module is not None:
            model.module = torch.compile(model.module, mode=mode, dynamic=self.config.compile_dynamic)
        elif self.config.packed_weights and isinstance(model.module, torch.nn.Module):
            # Eager: pack before the warm-up below, so it runs the kernels requests will.
            from plugins.model._packed_linear import pack_linears

            report.update(pack_linears(model.module))
        if not self.config.warmup:
            if mode is not None:
                log.warning("hardware.warmup=false with compile mode %s: the first requests pay for compiling",
                            mode)
            return report
        sizes = sorted({self.pad_batch_size(max(1, int(b))) for b in batch_sizes}) or [1]
        # pass 1 compiles (if compiled), pass 2 runs the compiled code once, CUDA graph trees record on
        # a later call: after these passes the first real request runs at steady-state speed
        passes = 1 + (mode is not None) + graphs
        for index in range(passes):
            start = time.perf_counter()
            for items in model.warmup_batches(sizes):
                size = len(items)
                if not items:
                    log.warning("model gives no example items; warm-up skipped")
                    return report
                try:
                    model.postprocess(model.forward(model.preprocess(items)))
                except Exception as exc:
                    if mode is not None and index == 0:
                        raise RuntimeError(f"torch.compile (mode={mode}) failed on a batch of {size}: "
                                           f"{type(exc).__name__}: {exc}; set hardware.compile=off to run "
                                           "eager") from exc
                    raise
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) * 1000.0
            report["compile_ms" if mode is not None and index == 0 else "warmup_ms"] += elapsed
        report["warmup_batch_sizes"] = sizes
        log.info("engine ready: compile=%s, batch sizes %s, compile %.0f ms, warm-up %.0f ms", mode or "off",
                 sizes, report["compile_ms"], report["warmup_ms"])
        return report

    def _optimize_onnx(self, model: ModelPlugin, device: str, batch_sizes: list[int]) -> dict:
        """Export + gate (``_onnx.prepare``), then one warm-up pass over the served shapes (ORT plans its
        memory per shape on first sight)."""
        self._eager = True  # ORT takes any shape: padding a batch up to a bucket would only add work
        if model.module is None:
            raise RuntimeError(f"hardware.runtime=onnxruntime: model {type(model).__name__} has no torch module "
                               "to export; set hardware.runtime=torch")
        report: dict = {"runtime": "onnxruntime", "compile": "off", "compile_mode": "off", "cuda_graphs": False,
                        "compile_ms": 0.0, "warmup_ms": 0.0, "warmup_batch_sizes": []}
        example = model.example_items(2) or model.example_items(1)
        if not example:
            raise RuntimeError("hardware.runtime=onnxruntime needs example items to export with; the model gives "
                               "none (ModelPlugin.example_items / calibration_items)")
        start = time.perf_counter()
        try:
            report["onnx"] = _onnx.prepare(model, device, self.config, model.preprocess(example))
        except _onnx.OnnxQualityError:
            raise
        except Exception as exc:
            raise RuntimeError(f"hardware.runtime=onnxruntime: exporting or opening the model failed: "
                               f"{type(exc).__name__}: {exc}; set hardware.runtime=torch") from exc
        report["compile_ms"] = round((time.perf_counter() - start) * 1000.0, 1)  # export + session + gate
        if not self.config.warmup:
            return report
        sizes = sorted({max(1, int(b)) for b in batch_sizes}) or [1]
        start = time.perf_counter()
        for items in model.warmup_batches(sizes):
            if items:
                model.postprocess(model.forward(model.preprocess(items)))
        report["warmup_ms"] = round((time.perf_counter() - start) * 1000.0, 1)
        report["warmup_batch_sizes"] = sizes
        log.info("engine ready: runtime=onnxruntime, export/session/gate %.0f ms, warm-up %.0f ms",
                 report["compile_ms"], report["warmup_ms"])
        return report
