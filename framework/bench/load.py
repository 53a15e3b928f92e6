"""Open-loop load: requests leave on a schedule, whatever the server is doing.

A closed-loop client (send, wait, send) slows down when the server does, so it measures a server
that is never overloaded: the latency of the requests it did *not* send is lost ("coordinated
omission"). Here every request has an *intended* send time from the arrival schedule (fixed rate,
or Poisson at a mean rate) and its latency is measured from that time. When the server stalls,
requests queue on the client side (the connection pool is bounded) and that wait counts.

Bounds: the schedule has at most ``max_requests`` entries; each request has ``timeout_s``; after a
stage's schedule ends the generator waits at most ``drain_s`` for answers, then cancels the rest;
a ``stop`` event (Ctrl-C) ends the run at the next tick and keeps what was measured.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from framework.bench.http_client import HttpProtocolError, make_client
from framework.bench.stats import StageStats
from framework.bench.workload import Request, Workload

ARRIVALS = ("constant", "poisson")
_TICK_S = 0.05  # the scheduler wakes at least this often to notice a stop request


@dataclass
class Stage:
    """One offered rate, held for ``duration_s``."""

    rate: float
    duration_s: float
    arrival: str = "constant"


@dataclass
class LoadOptions:
    url: str  # loopback base URL, e.g. http://127.0.0.1:8000
    path: str = "/predict"
    method: str = "POST"
    connections: int = 64  # the most requests in flight; beyond it requests wait (and that counts)
    timeout_s: float = 10.0
    drain_s: float = 10.0
    warmup_s: float = 0.0  # at the first stage's rate, not recorded
    # Before the warm-up, wait this long for one 2xx answer: a server can be healthy and still
    # compile on its first requests (0: skip).
    first_answer_timeout_s: float = 0.0
    slo_ms: float = 100.0
    client: str = "raw"  # raw | httpx
    seed: int = 0
    max_requests: int = 200_000
    progress: bool = False
    label: str = ""  # progress bar prefix
    use_uvloop: bool = True
    # Streamed chat (``framework.bench.chat``): time every SSE chunk; goodput under ``chat_slo``.
    stream: bool = False
    chat_slo: Any = None  # framework.bench.chat.Slo; None: its defaults


@dataclass
class LoadResult:
    stages: list[StageStats] = field(default_factory=list)
    interrupted: bool = False
    elapsed_s: float = 0.0
    first_answer_s: float | None = None  # how long the first request took (first_answer_timeout_s)
    first_answer_status: int | str | None = None

    def summaries(self) -> list[dict]:
        return [s.summary() for s in self.stages]


def arrival_offsets(stage: Stage, rng: random.Random, limit: int) -> list[float]:
    """Intended send times (seconds from the stage's start); at most ``limit`` of them."""
    if stage.rate <= 0 or stage.duration_s <= 0:
        return []
    if stage.arrival == "constant":
        n = min(int(round(stage.rate * stage.duration_s)), limit)
        return [i / stage.rate for i in range(n)]
    if stage.arrival == "poisson":
        out, t = [], 0.0
        while len(out) < limit:
            t += rng.expovariate(stage.rate)
            if t >= stage.duration_s:
                break
            out.append(t)
        return out
    raise ValueError(f"bench.arrival: must be one of {', '.join(ARRIVALS)}, got {stage.arrival!r}")


def planned_requests(stages: list[Stage], max_requests: int) -> int:
    """How many requests the stages will send (for sizing the workload and the progress bar)."""
    total = 0
    for st in stages:
        total += min(int(round(st.rate * st.duration_s)), max_requests - total)
    return max(total, 0)


class _Run:
    """The state of one ``drive`` call: client, workers and the stage being measured."""

    def __init__(self, options: LoadOptions, workload: Workload, stop: threading.Event, bar):
        self.o = options
        self.workload = workload
        self.stop = stop
        self.bar = bar
        self.client = make_client(options.client, options.url, options.connections, options.timeout_s)
        self.path = self.client.base_path + options.path
        self.queue: asyncio.Queue = asyncio.Queue()
        self.workers: list[asyncio.Task] = []
        self.closing = False

    def start_workers(self) -> None:
        self.workers = [asyncio.create_task(self._worker(self.client.connection()))
                        for _ in range(self.o.connections)]

    async def stop_workers(self) -> None:
        # Cancel until done: a cancel that races a finishing request can be swallowed (wait_for in
        # Python < 3.12, httpx), and the worker then sees ``closing`` and leaves on its own.
        self.closing = True
        for _ in range(20):
            pending = [t for t in self.workers if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
        self.workers = []
        self.closing = False
        while not self.queue.empty():
            self.queue.get_nowait()

    async def _worker(self, conn) -> None:
        try:
            while not self.closing:
                stats, intended, req, record = await self.queue.get()
                await self._send(conn, stats, intended, req, record)
        finally:
            conn.close()

    async def _send(self, conn, stats: StageStats, intended: float, req: Request, record: bool) -> None:
        if self.o.stream:
            from framework.bench.chat import stream_chat

            result = await stream_chat(conn, self.path, req.body, req.headers, intended, self.o.timeout_s,
                                       self.o.method)
            stats.record_chat(result)
            if record and self.bar is not None:
                self.bar.update(1)
            return
        sent = time.perf_counter()
        cache = None
        try:
            async with _timeout(self.o.timeout_s):
                status, headers, _ = await conn.request(self.o.method, self.path, req.body, req.headers)
            cache = headers.get("x-cache")
        except TimeoutError:  # before OSError: TimeoutError is one
            status = "timeout"
        except (OSError, HttpProtocolError, asyncio.IncompleteReadError, ValueError):
            status = "connect_error"
        except Exception as exc:  # httpx errors and anything unexpected: counted, never fatal
            status = type(exc).__name__
        stats.record(intended, sent, time.perf_counter(), status, cache)
        if record and self.bar is not None:
            self.bar.update(1)

    async def first_answer(self, timeout_s: float) -> tuple[float | None, int | str | None]:
        """Send one request at a time until a 2xx (or a 4xx: retrying will not fix a client error)."""
        conn = self.client.connection()
        began = time.perf_counter()
        deadline = began + timeout_s
        status: int | str | None = None
        try:
            for attempt in range(10_000):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.stop.is_set():
                    break
                req = self.workload.warmup_request(attempt)
                try:
                    async with _timeout(remaining):
                        status, _, _ = await conn.request(self.o.method, self.path, req.body, req.headers)
                except TimeoutError:
                    return None, "timeout"
                except (OSError, HttpProtocolError, asyncio.IncompleteReadError) as exc:
                    status = type(exc).__name__
                if isinstance(status, int) and 200 <= status < 500 and status not in (408, 429):
                    return time.perf_counter() - began, status
                await asyncio.sleep(0.2)
        finally:
            conn.close()
        return None, status

    async def run_stage(self, stage: Stage, stats: StageStats, offsets: list[float], warmup: bool,
                        first_index: int) -> None:
        """Send on schedule, then drain; afterwards ``stats.cancelled`` holds what never finished."""
        start = time.perf_counter() + 0.005
        n, i = len(offsets), 0
        self.start_workers()
        try:
            while i < n and not self.stop.is_set():
                now = time.perf_counter()
                while i < n and start + offsets[i] <= now:  # everything due: a late tick sends a burst
                    idx = first_index + i
                    req = self.workload.warmup_request(idx) if warmup else self.workload.request(idx)
                    self.queue.put_nowait((stats, start + offsets[i], req, not warmup))
                    i += 1
                if i < n:
                    delay = start + offsets[i] - time.perf_counter()
                    await asyncio.sleep(min(max(delay, 0.0), _TICK_S))
            deadline = time.perf_counter() + self.o.drain_s
            while stats.finished < i and time.perf_counter() < deadline and not self.stop.is_set():
                await asyncio.sleep(0.005)
        finally:
            await self.stop_workers()
            stats.issued = i
            stats.cancelled = i - stats.finished


def new_stats(options: LoadOptions, rate: float, **kw) -> StageStats:
    """A stage's recorder: ``ChatStageStats`` for streamed chat (its ``slo_ms`` is the TTFT objective)."""
    if not options.stream:
        return StageStats(rate, options.slo_ms, **kw)
    from framework.bench.chat import ChatStageStats, Slo

    slo = options.chat_slo or Slo()
    return ChatStageStats(rate, slo.ttft_ms, slo=slo, **kw)


async def drive(options: LoadOptions, stages: list[Stage], workload: Workload,
                stop: threading.Event | None = None) -> LoadResult:
    """Run every stage in order against ``options.url``; see the module docstring."""
    stop = stop or threading.Event()
    rng = random.Random(options.seed)
    result = LoadResult()
    began = time.perf_counter()
    total = planned_requests(stages, options.max_requests)
    bar = _progress_bar(options, total)
    run = _Run(options, workload, stop, bar)
    try:
        if options.first_answer_timeout_s > 0 and stages and not stop.is_set():
            result.first_answer_s, result.first_answer_status = await run.first_answer(
                options.first_answer_timeout_s)
        if options.warmup_s > 0 and stages and not stop.is_set():
            first = stages[0]
            warm = Stage(first.rate, options.warmup_s, first.arrival)
            offsets = arrival_offsets(warm, rng, options.max_requests)
            await run.run_stage(warm, new_stats(options, first.rate), offsets, True, 0)
        budget, index = options.max_requests, 0
        for stage in stages:
            if stop.is_set() or budget <= 0:
                break
            offsets = arrival_offsets(stage, rng, budget)
            stats = new_stats(options, stage.rate, arrival=stage.arrival, planned=len(offsets),
                              duration_s=len(offsets) / stage.rate)
            if bar is not None:
                bar.set_description(f"{options.label}{stage.rate:g} req/s".strip())
            await run.run_stage(stage, stats, offsets, False, index)
            result.stages.append(stats)
            budget -= len(offsets)
            index += len(offsets)
    finally:
        await run.client.aclose()
        if bar is not None:
            bar.close()
    result.interrupted = stop.is_set()
    result.elapsed_s = time.perf_counter() - began
    return result


def _timeout(seconds: float):
    """``asyncio.timeout`` (3.11+: cancels cleanly) with a ``wait_for``-free fallback for 3.10."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    return _Timeout310(seconds)


class _Timeout310:
    def __init__(self, seconds: float):
        self.seconds = seconds

    async def __aenter__(self):
        task = asyncio.current_task()
        self._timed_out = False

        def fire() -> None:
            self._timed_out = True
            task.cancel()

        self._handle = asyncio.get_running_loop().call_later(self.seconds, fire)

    async def __aexit__(self, exc_type, exc, tb):
        self._handle.cancel()
        if exc_type is asyncio.CancelledError and self._timed_out:
            raise TimeoutError
        return False


def _progress_bar(options: LoadOptions, total: int):
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc=options.label or "bench", leave=False, mininterval=0.5)


def run_load(options: LoadOptions, stages: list[Stage], workload: Workload,
             stop: threading.Event | None = None, handle_sigint: bool = False) -> LoadResult:
    """Run ``drive`` on a fresh event loop (uvloop when installed). With ``handle_sigint``, Ctrl-C
    sets ``stop`` instead of raising, so the stages measured so far are returned."""
    stop = stop or threading.Event()

    async def main() -> LoadResult:
        installed = False
        if handle_sigint and threading.current_thread() is threading.main_thread():
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
                installed = True
            except (NotImplementedError, RuntimeError):  # e.g. Windows: KeyboardInterrupt still works
                pass
        try:
            return await drive(options, stages, workload, stop)
        finally:
            if installed:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    factory = _uvloop_factory() if options.use_uvloop else None
    if factory is not None and sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())
    return asyncio.run(main())


def _uvloop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
