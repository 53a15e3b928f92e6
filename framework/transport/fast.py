"""The fast path: ZMQ ``ipc://`` PUSH/PULL sockets, awaited by asyncio, never polled."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Callable

import zmq
import zmq.asyncio

from framework.transport.base import ApiChannel, ChannelFactory, WorkerChannel

# Large high-water marks: admission control (server.max_queue) bounds the backlog, not ZMQ.
_HWM = 100_000


def _request_address(folder: str, worker_id: int) -> str:
    return f"ipc://{folder}/w{worker_id}"


def _reply_address(folder: str, pid: int) -> str:
    return f"ipc://{folder}/r{pid}"


class FastApiChannel(ApiChannel):
    def __init__(self, folder: str, num_workers: int):
        self.folder = folder
        self.num_workers = num_workers
        self.reply_to = _reply_address(folder, os.getpid())
        self.outstanding = [0] * num_workers
        self._rr = itertools.count()
        self._ctx: zmq.asyncio.Context | None = None
        self._task: asyncio.Task | None = None

    async def start(self, on_message: Callable[[bytes], None]) -> None:
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, _HWM)
        self._pull.bind(self.reply_to)
        self._push = []
        for worker_id in range(self.num_workers):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, _HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_request_address(self.folder, worker_id))
            self._push.append(sock)

        async def pump() -> None:
            while True:
                on_message(await self._pull.recv())

        self._task = asyncio.get_running_loop().create_task(pump(), name="hydraserve-replies")

    def pick_worker(self) -> int | None:
        # Least outstanding in this API process; ties broken round-robin so idle workers share load.
        start = next(self._rr) % self.num_workers
        order = [(start + i) % self.num_workers for i in range(self.num_workers)]
        best = min(order, key=lambda w: self.outstanding[w])
        return best

    async def send(self, message: bytes, worker: int | None) -> None:
        assert worker is not None
        self.outstanding[worker] += 1
        await self._push[worker].send(message, copy=False)

    def done(self, worker: int | None) -> None:
        if worker is not None and self.outstanding[worker] > 0:
            self.outstanding[worker] -= 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._ctx is not None:
            self._ctx.destroy(linger=0)


class FastWorkerChannel(WorkerChannel):
    def __init__(self, folder: str, worker_id: int):
        self.folder = folder
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, _HWM)
        address = _request_address(folder, worker_id)
        with contextlib.suppress(FileNotFoundError):  # a restarted worker rebinds its predecessor's address
            os.unlink(address[len("ipc://"):])
        self._pull.bind(address)
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._replies: dict[str, zmq.Socket] = {}

    def recv(self, timeout_s: float) -> list[bytes]:
        # Round up: a sub-millisecond wait must block ~1 ms, not spin through poll(0).
        if not self._poller.poll(math.ceil(timeout_s * 1000) if timeout_s > 0 else 0):
            return []
        out = []
        while True:
            try:
                out.append(self._pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return out

    def send(self, reply_to: str | int, message: bytes) -> None:
        sock = self._replies.get(reply_to)  # type: ignore[arg-type]
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, _HWM)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(str(reply_to))
            self._replies[reply_to] = sock  # type: ignore[index]
        sock.send(message, copy=False)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


class FastChannelFactory(ChannelFactory):
    name = "fast"

    def __init__(self, num_workers: int):
        # 0700 by mkdtemp: only this user can connect to the sockets.
        self.folder = tempfile.mkdtemp(prefix="hydraserve-ipc-")
        self.num_workers = num_workers
        self._owner = os.getpid()

    def api_channel(self, consumer_id: int) -> ApiChannel:
        return FastApiChannel(self.folder, self.num_workers)

    def worker_channel(self, worker_id: int) -> WorkerChannel:
        return FastWorkerChannel(self.folder, worker_id)

    def notify_api_processes(self, message: bytes, api_pids: list[int]) -> None:
        ctx = zmq.Context.instance()
        for pid in api_pids:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 500)
            sock.connect(_reply_address(self.folder, pid))
            sock.send(message)
            sock.close()

    def close(self) -> None:
        if os.getpid() == self._owner:
            shutil.rmtree(self.folder, ignore_errors=True)
