"""Prometheus metrics shared by every process of a server (LitServe's forked API processes and the
spawned inference workers), through prometheus_client's multiprocess mode.

The parent calls :func:`init_metrics_dir` before it starts any process: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder, which children inherit. Each process then writes its
own memory-mapped files there, and ``GET /metrics`` (any API process) sums them with :func:`render`.

The hot-path functions (:func:`observe_request`, :func:`observe_batch`, :func:`cache_lookup`, ...)
cost a dict lookup and one or two mmap writes: label children are bound once and kept.
Metric objects are created on first use in each process, so a parent that only serves ``/metrics``
writes no files of its own, and a forked child never writes through its parent's objects.
"""

from __future__ import annotations

import atexit
import glob
import multiprocessing.util
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

__all__ = [
    "cache_error",
    "cache_lookup",
    "generation_levers",
    "generation_step",
    "observe_generation",
    "observe_stream",
    "client_disconnected",
    "init_metrics_dir",
    "mark_dead",
    "observe_batch",
    "observe_request",
    "queue_depth_add",
    "rejected",
    "render",
    "request_finished",
    "request_started",
    "set_queue_depth",
    "slow_client",
    "spans_dropped",
]

ENV = "PROMETHEUS_MULTIPROC_DIR"
CACHE_RESULTS = ("hit", "semantic-hit", "miss", "bypass")
SLOW_CLIENT_REASONS = ("headers", "body", "connections")
REJECT_REASONS = ("queue_full", "deadline", "too_large", "unauthorized", "bad_request", "not_ready")

# Latency-first server: most of the resolution sits below 10 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Generation: a first token takes a prefill (tens of ms to seconds on a CPU), a whole answer seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class _Metrics:
    """The metric objects of one process (created lazily, after the multiprocess env is known)."""

    def __init__(self) -> None:
        multi = bool(os.environ.get(ENV))
        if multi != getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client picks its value class when it is first imported; if that happened
            # before PROMETHEUS_MULTIPROC_DIR was set (or unset), switch before any metric exists here.
            values.ValueClass = values.get_value_class()
        # In multiprocess mode the files are the registry; a private one avoids double registration
        # in the default REGISTRY (tests, libraries) and keeps single-process mode self-contained.
        self.registry = None if multi else CollectorRegistry()
        reg = self.registry
        self.request_duration = Histogram(
            "hydraserve_request_duration_seconds", "Time from request received to response sent.",
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=reg)
        self.in_flight = Gauge(
            "hydraserve_requests_in_flight", "Requests received and not yet answered.",
            multiprocess_mode="livesum", registry=reg)
        self.queue_depth = Gauge(
            "hydraserve_queue_depth", "Requests admitted and waiting for a worker.",
            multiprocess_mode="livesum", registry=reg)
        self.batch_size = Histogram(
            "hydraserve_batch_size", "Items per forward pass.", buckets=BATCH_BUCKETS, registry=reg)
        self.queue_wait = Histogram(
            "hydraserve_queue_wait_seconds", "Time a request waited between admission and its batch.",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.forward = Histogram(
            "hydraserve_forward_seconds", "Duration of one batch's forward pass (with pre/postprocess).",
            buckets=LATENCY_BUCKETS, registry=reg)
        self.cache_lookups = Counter(
            "hydraserve_cache_lookups", "Cache lookups by result.", ["result"], registry=reg)
        self.cache_errors = Counter(
            "hydraserve_cache_errors", "Cache calls that failed or were skipped (the store down or slow, "
            "in back-off): each lookup answered as a miss, each store dropped.", ["backend", "op"],
            registry=reg)
        self.rejected = Counter(
            "hydraserve_rejected", "Requests refused before running, by reason.", ["reason"],
            registry=reg)
        self.client_disconnects = Counter(
            "hydraserve_client_disconnects", "Requests whose client went away before its body was read.",
            registry=reg)
        self.slow_clients = Counter(
            "hydraserve_slow_clients", "Connections cut for a client's slowness (headers, body: "
            "server.header_timeout_s, server.body_timeout_s) or refused over server.max_connections.",
            ["reason"], registry=reg)
        self.spans_dropped = Counter(
            "hydraserve_spans_dropped", "Spans not exported: the collector down, slow or refusing, or the "
            "queue full (tracing.max_queue_size).", registry=reg)
        # Generation (vLLM's names with our prefix): what a person waiting for a reply sees.
        self.ttft = Histogram(
            "hydraserve_time_to_first_token_seconds", "Time from request received to its first token sent.",
            buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram(
            "hydraserve_inter_token_latency_seconds", "Time between two consecutive pieces of a streamed answer.",
            buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram(
            "hydraserve_e2e_request_latency_seconds", "Time from a generation request received to its last token.",
            buckets=E2E_BUCKETS, registry=reg)
        self.gen_queue = Histogram(
            "hydraserve_request_queue_time_seconds", "Time a generation request waited for a KV slot.",
            buckets=TTFT_BUCKETS, registry=reg)
        self.prompt_tokens = Histogram(
            "hydraserve_request_prompt_tokens", "Prompt tokens per finished generation request.",
            buckets=TOKEN_BUCKETS, registry=reg)
        self.output_tokens = Histogram(
            "hydraserve_request_generation_tokens", "Output tokens per finished generation request.",
            buckets=TOKEN_BUCKETS, registry=reg)
        self.running = Gauge(
            "hydraserve_num_requests_running", "Sequences holding a KV slot (being prefilled or decoded).",
            multiprocess_mode="livesum", registry=reg)
        self.waiting = Gauge(
            "hydraserve_num_requests_waiting", "Generation requests waiting for a KV slot.",
            multiprocess_mode="livesum", registry=reg)
        self.kv_usage = Gauge(
            "hydraserve_kv_cache_usage_perc", "Fraction of KV-cache positions in use (the fullest worker).",
            multiprocess_mode="livemax", registry=reg)
        self.prompt_tokens_total = Counter(
            "hydraserve_prompt_tokens", "Prompt tokens run through the model (prefill).", registry=reg)
        self.generation_tokens_total = Counter(
            "hydraserve_generation_tokens", "Tokens generated by the model (decode steps), cancelled "
            "sequences' included until they stop.", registry=reg)
        # Generation levers (vLLM's names): prefix-cache reuse and speculative decoding, in tokens.
        self.prefix_queries = Counter(
            "hydraserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=reg)
        self.prefix_hits = Counter(
            "hydraserve_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache (not computed).",
            registry=reg)
        self.prefix_evicted = Counter(
            "hydraserve_prefix_cache_evicted_blocks", "Prefix-cache blocks evicted (least recently used) to "
            "make room.", registry=reg)
        self.prefix_blocks = Gauge(
            "hydraserve_prefix_cache_blocks", "Blocks held by the prefix cache.", multiprocess_mode="livesum",
            registry=reg)
        self.spec_drafts = Counter(
            "hydraserve_spec_decode_num_drafts", "Speculative drafts verified.", registry=reg)
        self.spec_draft_tokens = Counter(
            "hydraserve_spec_decode_num_draft_tokens", "Tokens proposed by speculative drafts.", registry=reg)
        self.spec_accepted_tokens = Counter(
            "hydraserve_spec_decode_num_accepted_tokens", "Draft tokens the model agreed with (each saved a "
            "forward).", registry=reg)
        # Pre-bound children: the hot path indexes a dict instead of calling .labels().
        self.request_children: dict[tuple, object] = {}
        self.cache_children = {r: self.cache_lookups.labels(r) for r in CACHE_RESULTS}
        self.reject_children = {r: self.rejected.labels(r) for r in REJECT_REASONS}
        self.cache_error_children: dict[tuple, object] = {}
        self.slow_children = {r: self.slow_clients.labels(r) for r in SLOW_CLIENT_REASONS}
        for r in CACHE_RESULTS:  # zeros are exported too, so rate() works from the first scrape
            self.cache_children[r].inc(0)
        for r in SLOW_CLIENT_REASONS:
            self.slow_children[r].inc(0)
        self.client_disconnects.inc(0)
        self.spans_dropped.inc(0)
        if multi:
            _register_exit_hook()


_m: _Metrics | None = None
_m_lock = threading.Lock()
_dir_owned: str | None = None  # folder made by init_metrics_dir in this process (removed at exit)
_hook_pid: int | None = None


def _metrics() -> _Metrics:
    global _m
    m = _m
    if m is None:
        with _m_lock:
            if _m is None:
                _m = _Metrics()
            m = _m
    return m


def _forget_after_fork() -> None:
    # The child builds its own objects on first use (and registers its own exit hook); the
    # parent's would keep a registration made for the parent's pid.
    global _m, _m_lock, _hook_pid, _dir_owned
    _m, _m_lock, _hook_pid, _dir_owned = None, threading.Lock(), None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _register_exit_hook() -> None:
    global _hook_pid
    pid = os.getpid()
    if _hook_pid == pid:
        return
    _hook_pid = pid
    atexit.register(mark_dead, pid)
    # multiprocessing children leave through os._exit: atexit never runs there, finalizers do.
    multiprocessing.util.Finalize(None, mark_dead, args=(pid,), exitpriority=0)


# --------------------------------------------------------------------------------------------- set up


def init_metrics_dir(path: str | None = None) -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder and return it; call before starting processes.

    Idempotent in one process. With ``path`` that folder is used and emptied of stale ``*.db`` files
    (left from an earlier run they would add old counts); otherwise a temp folder is made and
    removed at exit.
    """
    global _dir_owned
    if path is None and _dir_owned is not None and os.environ.get(ENV) == _dir_owned:
        return _dir_owned
    previous = os.environ.get(ENV)
    if path is None:
        path = tempfile.mkdtemp(prefix="hydraserve-metrics-")
        _dir_owned = path
        atexit.register(_remove_dir, path, os.getpid())
    else:
        os.makedirs(path, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):
            os.remove(f)
    os.environ[ENV] = path
    if _m is not None or previous != path:
        # Metrics made before (per process, or writing to another folder) are made again here.
        _reset()
    return path


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _reset() -> None:
    """Forget this process's metric objects; the next observation makes them in the current folder."""
    global _m
    with _m_lock:
        _m = None
        # A fresh value class: the old one keeps its open files (in the old folder) by file name.
        values.ValueClass = values.get_value_class()


def mark_dead(pid: int) -> None:
    """Drop a finished process's live gauges (in flight, queue depth) from the sums."""
    path = os.environ.get(ENV)
    if path and os.path.isdir(path):
        multiprocess.mark_process_dead(pid, path)


_LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db$")


def _sweep_dead(path: str) -> None:
    """Processes killed by a signal run no exit hook: forget live gauges of pids that are gone."""
    for f in os.listdir(path):
        match = _LIVE_FILE.match(f)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, owned by someone else


# ----------------------------------------------------------------------------------------- hot path


def observe_request(route: str, status: int | str, seconds: float) -> None:
    """One answered request: its route template (e.g. ``/predict``), HTTP status and duration."""
    m = _m or _metrics()
    key = (route, status)
    child = m.request_children.get(key)
    if child is None:
        child = m.request_children[key] = m.request_duration.labels(route, str(status))
    child.observe(seconds)


def request_started() -> None:
    (_m or _metrics()).in_flight.inc()


def request_finished() -> None:
    (_m or _metrics()).in_flight.dec()


def set_queue_depth(depth: int) -> None:
    """This process's share of the queue depth (the exported value is the sum over live processes)."""
    (_m or _metrics()).queue_depth.set(depth)


def queue_depth_add(delta: int) -> None:
    """``+1`` when a request is queued by this process, ``-1`` when its batch takes it."""
    (_m or _metrics()).queue_depth.inc(delta)


def observe_batch(size: int, queue_waits: Iterable[float] = (), forward_s: float | None = None) -> None:
    """One batch: its item count, each request's queue wait (seconds), its forward time (seconds)."""
    m = _m or _metrics()
    m.batch_size.observe(size)
    observe = m.queue_wait.observe
    for wait in queue_waits:
        observe(wait)
    if forward_s is not None:
        m.forward.observe(forward_s)


def observe_stream(ttft_s: float | None, gaps_s: Iterable[float] = (), e2e_s: float | None = None) -> None:
    """A streamed generation as its client saw it (API process): time to first token, the gaps
    between pieces, the whole request. Each is optional, so a request can report as it goes."""
    m = _m or _metrics()
    if ttft_s is not None:
        m.ttft.observe(ttft_s)
    observe = m.itl.observe
    for gap in gaps_s:
        observe(gap)
    if e2e_s is not None:
        m.e2e.observe(e2e_s)


def observe_generation(queue_s: float, prompt_tokens: int, output_tokens: int) -> None:
    """A finished generation, worker side: its wait for a KV slot and its token counts."""
    m = _m or _metrics()
    m.gen_queue.observe(queue_s)
    m.prompt_tokens.observe(prompt_tokens)
    m.output_tokens.observe(output_tokens)


def generation_step(running: int, waiting: int, kv_usage: float, prefill_tokens: int, decode_tokens: int) -> None:
    """The engine after a step: sequences running and waiting, KV use, tokens the step computed."""
    m = _m or _metrics()
    m.running.set(running)
    m.waiting.set(waiting)
    m.kv_usage.set(kv_usage)
    if prefill_tokens:
        m.prompt_tokens_total.inc(prefill_tokens)
    if decode_tokens:
        m.generation_tokens_total.inc(decode_tokens)


def generation_levers(prefix_queries: int, prefix_hits: int, prefix_evicted: int, spec_drafts: int,
                      spec_draft_tokens: int, spec_accepted_tokens: int, prefix_blocks: int | None) -> None:
    """Counts since the last call (tokens, blocks, drafts) for the prefix cache and speculation;
    ``prefix_blocks`` is the cache's size now (None: no prefix cache)."""
    m = _m or _metrics()
    for counter, n in ((m.prefix_queries, prefix_queries), (m.prefix_hits, prefix_hits),
                       (m.prefix_evicted, prefix_evicted), (m.spec_drafts, spec_drafts),
                       (m.spec_draft_tokens, spec_draft_tokens), (m.spec_accepted_tokens, spec_accepted_tokens)):
        if n:
            counter.inc(n)
    if prefix_blocks is not None:
        m.prefix_blocks.set(prefix_blocks)


def _count(children: dict, counter: Counter, label: str) -> None:
    # Label children are bound once per process and kept: .labels() on the hot path costs a lock.
    child = children.get(label)
    if child is None:
        child = children[label] = counter.labels(label)
    child.inc()


def cache_lookup(result: str) -> None:
    """``result``: hit, semantic-hit, miss or bypass."""
    m = _m or _metrics()
    _count(m.cache_children, m.cache_lookups, result)


def cache_error(backend: str, op: str, n: int = 1) -> None:
    """A cache call that failed or was skipped: ``backend`` (e.g. ``redis``), ``op`` ``get`` or ``put``;
    ``n=0`` exports the series at zero (a store calls it when it opens, so rate() works at once)."""
    m = _m or _metrics()
    key = (backend, op)
    child = m.cache_error_children.get(key)
    if child is None:
        child = m.cache_error_children[key] = m.cache_errors.labels(backend, op)
    child.inc(n)


def rejected(reason: str) -> None:
    """A request refused before running: queue_full, deadline, too_large, unauthorized, ..."""
    m = _m or _metrics()
    _count(m.reject_children, m.rejected, reason)


def client_disconnected() -> None:
    """A client closed its connection before its request's body was read (not a server error)."""
    (_m or _metrics()).client_disconnects.inc()


def slow_client(reason: str) -> None:
    """A connection cut for slowness (``headers``, ``body``) or refused (``connections``)."""
    m = _m or _metrics()
    _count(m.slow_children, m.slow_clients, reason)


def spans_dropped(n: int) -> None:
    """``n`` spans that tracing could not export (it drops rather than makes a request wait)."""
    (_m or _metrics()).spans_dropped.inc(n)


# ----------------------------------------------------------------------------------------- exposition


def render() -> tuple[bytes, str]:
    """The body and content type of ``GET /metrics``: every live process's metrics, summed."""
    m = _m or _metrics()  # this process's series exist (zeros included) from the first scrape
    path = os.environ.get(ENV)
    if path and os.path.isdir(path) and m.registry is None:
        _sweep_dead(path)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(m.registry), CONTENT_TYPE_LATEST
