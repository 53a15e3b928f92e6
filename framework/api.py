"""The composed LitAPI: carries the config (plain data, picklable) into each spawned worker.

Nothing heavy happens in the parent: ``setup(device)`` re-validates the config inside the worker,
loads, quantizes, gates, compiles and warms the model (``framework.engine.prepare_model``), and
the loop (``HydraLoop``) then serves from the transport. Decode/encode never run here: they run in
the API process (``framework/http.py``) so bad requests and cache hits never reach a worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import litserve as ls
import orjson

from framework import tracing
from framework.config import Resolved, validate
from framework.litserve_adapter import HydraLoopBase
from framework.plugin import GenerativeModelPlugin

log = logging.getLogger("hydraserve.worker")


class HydraLoop(HydraLoopBase):
    """LitServe loop that hands the worker to ``framework.worker.serve_forever``."""

    def __init__(self) -> None:
        super().__init__()
        self.factory = None  # set by the server once the transport exists, before workers spawn
        self.reports = None  # Manager dict: worker start-up reports and errors, read by /info

    def serve(self, lit_api: ls.LitAPI, device: Any, worker_id: int) -> None:
        from framework.worker import serve_forever

        if self.reports is not None:
            self.reports[f"worker-{worker_id}"] = orjson.dumps(lit_api.report).decode()
        channel = lit_api.channel
        r: Resolved = lit_api.resolved
        labels = {"model": r.names()["model"], "quantization": r.names()["quantization"], "device": str(device)}
        try:
            engine = getattr(lit_api, "engine", None)
            if engine is not None:  # a generative model: the continuous-batching loop
                from framework.generation_worker import serve_generation

                serve_generation(engine, r.model, channel, labels)
            else:
                serve_forever(r.model, r.batching, r.hardware, channel, labels)
        finally:
            channel.close()
            tracing.shutdown()


class ComposedAPI(ls.LitAPI):
    def __init__(self, raw_config: dict, output_dir: str):
        super().__init__(max_batch_size=1, api_path="/predict", loop=HydraLoop())
        self.raw_config = raw_config
        self.output_dir = output_dir
        self.report: dict = {}

    def setup(self, device: str) -> None:
        from framework.engine import prepare_model
        from framework.lifecycle import die_with_parent, gc_state, tune_gc

        worker_id = os.environ.get("LITSERVE_WORKER_ID", "?")
        die_with_parent()  # never outlive the server (a SIGKILLed main process included)
        try:
            self.resolved = validate(self.raw_config)
            r = self.resolved
            log_to_server_log(r.server.log_level)
            tracing.init_tracing(r.tracing, r.resource_attributes(), self.output_dir)
            self.report = {"worker": worker_id, "pid": os.getpid(), "device": str(device)}
            if isinstance(r.model, GenerativeModelPlugin):
                from framework.generation_worker import prepare_generation

                self.engine, report = prepare_generation(r.model, r.quantization, r.hardware, str(device),
                                                         r.batching.engine_config())
                self.report.update(report)
            else:
                self.report.update(prepare_model(r.model, r.quantization, r.hardware, str(device),
                                                 batch_sizes_to_warm(r)))
            # Listen before LitServe marks this worker READY, so API processes can connect at once.
            self.channel = self.loop.factory.worker_channel(int(worker_id))
            tune_gc(r.server.gc_freeze, r.server.gc_thresholds)  # the model and its modules are built
            self.report["gc"] = gc_state()
            log.info("worker %s ready on %s: %s; report %s", worker_id, device, startup_summary(self.report),
                     orjson.dumps(self.report).decode())
        except Exception as exc:
            # Tell the parent why, so `serve` can print it instead of a bare "worker failed".
            loop = self.loop
            if getattr(loop, "reports", None) is not None:
                loop.reports[f"error-{worker_id}"] = f"{type(exc).__name__}: {exc}"
            raise

    # LitServe's default hooks are never called: the fast path bypasses them by design.
    def predict(self, x: Any) -> Any:  # pragma: no cover
        raise RuntimeError("ComposedAPI.predict is not used; framework.worker runs the model")


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job logging


def log_to_server_log(level: str = "info") -> None:
    """A spawned worker starts with no logging set up, so its INFO lines (the start-up report)
    were dropped; send ``hydraserve.*`` records to stderr, which is the server's log, at
    ``server.log_level``. Nothing is added where the process already has handlers."""
    logger = logging.getLogger("hydraserve")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    name = str(level).upper()
    logger.setLevel(logging.DEBUG if name == "TRACE" else getattr(logging, name, logging.INFO))


def startup_summary(report: dict) -> str:
    """One readable line of a worker's start-up report: quality gate, compilation, timings."""
    if report.get("engine") == "continuous":
        return (f"continuous batching: max_num_seqs={report.get('max_num_seqs')} "
                f"max_num_batched_tokens={report.get('max_num_batched_tokens')} "
                f"max_model_len={report.get('max_model_len')}, KV cache {report.get('kv_cache_mib')} MiB, "
                f"load {report.get('load_ms')} ms, warm-up {report.get('warmup_ms')} ms, "
                f"start-up {report.get('startup_ms')} ms")
    return (f"quantization={report.get('quantization')} quality={report.get('quality')} "
            f"(min {report.get('min_quality')}, gate: {report.get('quality_gate')}), "
            f"compile={report.get('compile_mode')} in {report.get('compile_ms')} ms, "
            f"warm-up {report.get('warmup_ms')} ms for batch sizes {report.get('warmup_batch_sizes')}, "
            f"start-up {report.get('startup_ms')} ms")


def batch_sizes_to_warm(r: Resolved) -> list[int]:
    """The (padded) batch shapes the server will see, so compilation happens before the first request."""
    from framework.engine import warmup_batch_sizes

    return warmup_batch_sizes(r.hardware, r.batching.max_batch_size)
