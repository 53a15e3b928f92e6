"""LitServe 0.2.19's stock path, for comparison: a Manager queue in, ``MPQueueTransport`` out.

Every put/get is a round trip through the manager process and answers are read through
``asyncio.to_thread``; that is what the fast path removes (see benchmarks/overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Callable
from typing import Any

from framework.transport.base import ApiChannel, ChannelFactory, WorkerChannel


class StockApiChannel(ApiChannel):
    def __init__(self, request_queue: Any, transport: Any, consumer_id: int):
        self._queue = request_queue
        self._transport = transport
        self.reply_to = consumer_id
        self._task: asyncio.Task | None = None

    async def start(self, on_message: Callable[[bytes], None]) -> None:
        async def pump() -> None:
            while True:
                item = await self._transport.areceive(self.reply_to)  # to_thread + 1 s get timeout, as LitServe
                if item is not None:
                    on_message(item)

        self._task = asyncio.get_running_loop().create_task(pump(), name="hydraserve-replies")

    def pick_worker(self) -> int | None:
        return None  # workers share one queue

    async def send(self, message: bytes, worker: int | None) -> None:
        self._queue.put(message)  # a blocking manager round trip, exactly as LitServe does it

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class StockWorkerChannel(WorkerChannel):
    def __init__(self, request_queue: Any, transport: Any):
        self._queue = request_queue
        self._transport = transport

    def recv(self, timeout_s: float) -> list[bytes]:
        out = []
        try:
            out.append(self._queue.get(timeout=max(timeout_s, 0.001)))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def send(self, reply_to: str | int, message: bytes) -> None:
        self._transport.send(message, consumer_id=int(reply_to))


class StockChannelFactory(ChannelFactory):
    name = "litserve"

    def __init__(self, request_queue: Any, transport: Any):
        self.request_queue = request_queue
        self.transport = transport

    def api_channel(self, consumer_id: int) -> ApiChannel:
        return StockApiChannel(self.request_queue, self.transport, consumer_id)

    def worker_channel(self, worker_id: int) -> WorkerChannel:
        return StockWorkerChannel(self.request_queue, self.transport)

    def notify_api_processes(self, message: bytes, api_pids: list[int]) -> None:
        for consumer_id in range(len(api_pids)):
            with contextlib.suppress(Exception):
                self.transport.send(message, consumer_id=consumer_id)
