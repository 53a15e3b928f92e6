"""The inference worker for generative models: start-up, then the continuous-batching loop.

``prepare_generation`` loads the model, builds the engine with the ``batching=continuous`` budgets
and generates once so the first request does not pay for cold paths. ``serve_generation`` is the
worker's loop: between two engine steps it takes every frame that arrived (new requests join the
running batch at the next step; cancel frames drop their sequence before it), drops sequences whose
client deadline passed, runs one step, and sends each sequence's new text as a chunk frame. A
finished sequence's last chunk carries its finish reason and token counts, then an end frame; a
sampled request's spans are recorded here, under the span its request frame names. Frames are the protocol's
(``framework/transport/protocol.py``); nothing here knows HTTP or OpenAI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from framework import metrics, tracing
from framework.errors import RequestError
from framework.generation import (
    EngineConfig,
    EngineLike,
    GenerationEngine,
    GenerationRequest,
    QueueFullError,
    RequestTooLongError,
    SamplingParams,
)
from framework.plugin import GenerativeModelPlugin, HardwarePlugin, QuantizationPlugin
from framework.transport.base import WorkerChannel
from framework.transport.protocol import (
    ProtocolError,
    RequestFrame,
    decode_control,
    decode_request,
    encode_chunk,
    encode_end,
    encode_error,
)

log = logging.getLogger("hydraserve.worker")

_IDLE_WAIT_S = 1.0  # one blocking receive when nothing runs (only bounds how fast shutdown is seen)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)


def prepare_generation(model: GenerativeModelPlugin, quantization: QuantizationPlugin, hardware: HardwarePlugin,
                       device: str, config: EngineConfig) -> tuple[EngineLike, dict]:
    """Load ``model``, build its engine and warm it up; returns the engine and the start-up report."""
    started = time.perf_counter()
    report: dict[str, Any] = {"device": str(device), "quantization": quantization.scheme_name,
                              "engine": "continuous"}
    t = time.perf_counter()
    hardware.setup_process()
    report["setup_ms"] = _ms(t)
    t = time.perf_counter()
    own = model.generation_engine(str(device), config)  # a model's own engine (vLLM), or None
    if own is not None:
        report.update(load_ms=_ms(t), engine=getattr(own, "name", type(own).__name__),
                      **getattr(own, "report", {}))
        return _warm_up(own, model, config, report, started)
    model.load(device)
    report["load_ms"] = _ms(t)
    if not quantization.is_identity():
        # Quantize the loaded weights in place (the engine runs the model's own layers), then compare
        # with a full-precision copy on greedy tokens and perplexity; below the floor this raises
        # GenerationQualityGateError and the worker does not start (framework/generation/quality.py).
        from framework.generation.quality import quantize_and_gate

        report.update(quantize_and_gate(model, quantization, device))
    forward = model.batched_forward(config.max_num_seqs, config.max_model_len,
                                    compile_mode=getattr(hardware.config, "compile", "off"),
                                    packed_weights=bool(getattr(hardware.config, "packed_weights", False)))
    engine = GenerationEngine(forward, model.tokenizer, config, eos_token_ids=model.eos_token_ids())
    report["decode_compile"] = forward.warmup() if hasattr(forward, "warmup") else {"compile_mode": "off"}
    report.update(getattr(forward, "report", {}))  # e.g. how many weights were packed
    per_token = model.kv_bytes_per_token()
    report.update(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                  max_model_len=config.max_model_len, max_waiting=config.max_waiting,
                  kv_cache_mib=None if per_token is None else
                  round(per_token * config.max_num_seqs * config.max_model_len / 2**20, 1))
    return _warm_up(engine, model, config, report, started)


def _warm_up(engine: EngineLike, model: GenerativeModelPlugin, config: EngineConfig, report: dict,
             started: float) -> tuple[EngineLike, dict]:
    # One short generation: the first request's prefill and decode then find warm kernels and caches.
    t = time.perf_counter()
    ids = model.prompt_ids(model.warmup_prompt())[: max(1, config.max_model_len - 2)]
    engine.add(GenerationRequest(prompt_ids=ids, max_tokens=2, ignore_eos=True))
    while engine.has_work():
        engine.step()
    report["warmup_ms"] = _ms(t)
    report["startup_ms"] = _ms(started)
    return engine, report


@dataclass(slots=True)
class _Live:
    """A request being generated: its frame and what its client has been sent."""

    frame: RequestFrame
    seq_id: int


def _wall_ns(mono: float | None, now_mono: float, now_ns: int) -> int:
    """A monotonic timestamp on the wall clock (spans use wall-clock nanoseconds)."""
    return now_ns if mono is None else now_ns - round((now_mono - mono) * 1e9)


class GenerationLoop:
    """Owns the engine between steps: admission from frames, cancels, deadlines, outputs to frames."""

    def __init__(self, engine: GenerationEngine, model: GenerativeModelPlugin, channel: WorkerChannel,
                 labels: dict):
        self.engine = engine
        self.model = model
        self.channel = channel
        self.labels = labels
        self.live: dict[int, _Live] = {}  # seq id -> request
        self.by_request: dict[str, int] = {}  # request id -> seq id
        self._counted = (0, 0)  # engine token counters already exported
        self._levers = (0,) * 6  # prefix-cache and speculation counters already exported

    # --- frames in -------------------------------------------------------------------------------
    def take(self, raw_messages: list[bytes]) -> None:
        for raw in raw_messages:
            try:
                rid = decode_control(raw)
                if rid is not None:
                    self.cancel(rid)
                    continue
                frame = decode_request(raw)
            except ProtocolError as exc:  # a malformed frame is dropped, never a crash
                log.warning("dropping a malformed frame (%d bytes): %s", len(raw), exc)
                continue
            self.admit(frame)

    def admit(self, frame: RequestFrame) -> None:
        item = frame.items[0]
        try:
            if len(frame.items) != 1 or not isinstance(item, dict) or not isinstance(item.get("prompt"), dict):
                raise RequestError("a generation request carries exactly one prompt", field="prompt", status=400)
            request = self._request(item)
            seq_id = self.engine.add(request)
        except RequestTooLongError as exc:
            self._send(frame, encode_error(frame.id, 400, str(exc), {"field": "max_tokens"}))
            return
        except QueueFullError as exc:
            metrics.rejected("queue_full")
            self._send(frame, encode_error(frame.id, 503, "server is at capacity; retry later", str(exc)))
            return
        except RequestError as exc:
            self._send(frame, encode_error(frame.id, exc.status, exc.message,
                                           {"field": exc.field} if exc.field else None))
            return
        except ValueError as exc:  # the engine's parameter checks: the client's values
            self._send(frame, encode_error(frame.id, 400, str(exc)))
            return
        except Exception as exc:  # a tokenizer or template failure: the model's, not the client's
            log.exception("could not start generation for request %s", frame.id)
            self._send(frame, encode_error(frame.id, 500, "model failure", f"{type(exc).__name__}: {exc}"))
            return
        self.live[seq_id] = _Live(frame, seq_id)
        self.by_request[frame.id] = seq_id

    def _request(self, item: dict) -> GenerationRequest:
        ids = self.model.prompt_ids(item["prompt"])
        max_tokens = item.get("max_tokens")
        if max_tokens is None:  # OpenAI's default: until the context is full
            max_tokens = max(1, self.engine.config.max_model_len - len(ids))
        return GenerationRequest(
            prompt_ids=ids, max_tokens=int(max_tokens),
            sampling=SamplingParams(temperature=float(item.get("temperature", 1.0)),
                                    top_p=float(item.get("top_p", 1.0)), seed=item.get("seed")),
            stop=list(item.get("stop") or []), ignore_eos=bool(item.get("ignore_eos", False)))

    def cancel(self, rid: str) -> None:
        """The client went away (or its API process gave up on it): stop computing it now."""
        seq_id = self.by_request.pop(rid, None)
        if seq_id is not None:
            self.live.pop(seq_id, None)
            self.engine.cancel(seq_id)

    def expire(self, now: float) -> None:
        """Drop sequences whose client deadline (X-Request-Timeout-Ms) has passed."""
        for entry in list(self.live.values()):
            if entry.frame.deadline <= now:
                self.cancel(entry.frame.id)
                self._send(entry.frame, encode_error(entry.frame.id, 504, "deadline exceeded"))

    # --- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        outputs = self.engine.step()
        for out in outputs:
            entry = self.live.get(out.seq_id)
            if entry is None:  # cancelled: its client is not waiting for anything
                continue
            if not out.finished:
                if out.text:  # a token that ends mid-character releases its text with the next one
                    self._send(entry.frame, encode_chunk(entry.frame.id, {"t": out.text, "n": out.completion_tokens}))
                continue
            self._finish(entry, out)
        self.export()

    def _finish(self, entry: _Live, out: Any) -> None:
        frame = entry.frame
        self.live.pop(out.seq_id, None)
        self.by_request.pop(frame.id, None)
        self._send(frame, encode_chunk(frame.id, {"t": out.text, "n": out.completion_tokens, "f": out.finish_reason,
                                                   "p": out.prompt_tokens}))
        seq = self.engine.finished(out.seq_id)
        self._send(frame, encode_end(frame.id))
        if seq is not None:
            metrics.observe_generation(
                queue_s=(seq.admitted_at or frame.arrival) - frame.arrival,
                prompt_tokens=out.prompt_tokens, output_tokens=out.completion_tokens)
            if frame.parent is not None:
                tracing.record_tree(frame.parent, self._spans(frame, seq, out))

    def _spans(self, frame: RequestFrame, seq: Any, out: Any) -> bytes:
        """The request's worker spans: its wait for a KV slot, its prefill (to the first token) and its
        decode (the rest), as OTLP/JSON (``tracing.encode_spans``), to record under its span."""
        now_mono, now_ns = time.monotonic(), time.time_ns()
        queued = _wall_ns(frame.arrival, now_mono, now_ns)
        admitted = _wall_ns(seq.admitted_at, now_mono, now_ns)
        first = _wall_ns(seq.first_token_at, now_mono, now_ns)
        finished = _wall_ns(seq.finished_at, now_mono, now_ns)
        prefill = {**self.labels, "gen_ai.usage.input_tokens": out.prompt_tokens,
                   "prefix_cache.hit_tokens": seq.prefix_hit_tokens}
        decode = {**self.labels, "gen_ai.usage.output_tokens": out.completion_tokens,
                  "gen_ai.response.finish_reasons": [out.finish_reason]}
        return tracing.encode_spans([("queue.wait", queued, admitted, None, -1, None),
                                     ("gen_ai.prefill", admitted, first, prefill, -1, None),
                                     ("gen_ai.decode", first, finished, decode, -1, None)])

    def export(self) -> None:
        """The engine's gauges and token counters into /metrics (a few mmap writes per step)."""
        engine = self.engine
        prefill, decode = engine.prefill_tokens, engine.decode_tokens
        metrics.generation_step(engine.num_running, engine.num_waiting, engine.kv_usage(),
                                prefill - self._counted[0], decode - self._counted[1])
        self._counted = (prefill, decode)
        prefix = getattr(engine, "prefix", None)
        now = ((prefix.query_tokens, prefix.hit_tokens, prefix.evicted_blocks) if prefix is not None else (0, 0, 0)) + (
            getattr(engine, "spec_drafts", 0), getattr(engine, "spec_draft_tokens", 0),
            getattr(engine, "spec_accepted_tokens", 0))
        if now != self._levers:
            metrics.generation_levers(*(a - b for a, b in zip(now, self._levers, strict=True)),
                                      None if prefix is None else prefix.num_blocks)
            self._levers = now

    def _send(self, frame: RequestFrame, message: bytes) -> None:
        self.channel.send(frame.reply_to, message)


def serve_generation(engine: GenerationEngine, model: GenerativeModelPlugin, channel: WorkerChannel,
                     labels: dict) -> None:
    loop = GenerationLoop(engine, model, channel, labels)
    while True:
        if not engine.has_work():
            loop.take(channel.recv(_IDLE_WAIT_S))
            if not engine.has_work():
                loop.export()  # idle: the gauges read zero
            continue
        # Whatever arrived during the last step joins (or leaves) before the next one.
        loop.take(channel.recv(0))
        loop.expire(time.monotonic())
        if engine.has_work():
            loop.step()
