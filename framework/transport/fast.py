"""The fast path: one Unix stream socket per (API process, worker) pair, length-prefixed frames.

Why not a queue or a broker: every hop through another thread or process is a wake-up, and on a
small machine wake-ups are the latency. Here the API process's asyncio loop reads each worker's
socket through its own reader callback (no helper thread, no polling), and the worker blocks in
``select`` on its listening socket and connections. A request costs one ``send`` each way.

The connection doubles as a liveness signal: when a worker dies, its sockets reach EOF in every API
process at once, which fails that worker's in-flight requests immediately (503) without any message
from the main process; the API process reconnects when the restarted worker listens again.

Frames are ``!I`` (payload length) + payload. The first frame an API process sends on a connection
is its reply id; the worker answers each request on the connection of the ``to`` it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import selectors
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable

from framework.transport.base import ApiChannel, ChannelFactory, NoWorkerAvailable, WorkerChannel
from framework.transport.protocol import encode_worker_dead

_FRAME = struct.Struct("!I")
_READ = 1 << 20
_RECONNECT_EVERY_S = 0.2


def _socket_path(folder: str, worker_id: int) -> str:
    return os.path.join(folder, f"w{worker_id}.sock")


def _frames(buffer: bytearray) -> list[bytes]:
    """Cut every complete frame off the front of ``buffer``."""
    out = []
    while len(buffer) >= 4:
        (size,) = _FRAME.unpack_from(buffer)
        if len(buffer) < 4 + size:
            break
        out.append(bytes(buffer[4:4 + size]))
        del buffer[:4 + size]
    return out


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload)) + payload


class _Connection:
    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()


class FastApiChannel(ApiChannel):
    def __init__(self, folder: str, num_workers: int):
        self.folder = folder
        self.num_workers = num_workers
        self.reply_to = str(os.getpid())
        self.outstanding = [0] * num_workers
        self._conns: list[_Connection | None] = [None] * num_workers
        self._last_attempt = [0.0] * num_workers
        self._rr = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[bytes], None] | None = None

    async def start(self, on_message: Callable[[bytes], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        for worker in range(self.num_workers):
            self._connect(worker)

    def _connect(self, worker: int) -> bool:
        self._last_attempt[worker] = time.monotonic()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(_socket_path(self.folder, worker))
            sock.sendall(_frame(self.reply_to.encode()))
        except OSError:  # not listening (yet, or any more): try again later
            sock.close()
            return False
        sock.setblocking(False)
        conn = _Connection(sock)
        self._conns[worker] = conn
        self._loop.add_reader(sock.fileno(), self._readable, worker, conn)
        return True

    def _readable(self, worker: int, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(worker, conn)
            return
        conn.buffer += data
        for payload in _frames(conn.buffer):
            self._on_message(payload)

    def _lost(self, worker: int, conn: _Connection) -> None:
        if self._conns[worker] is conn:
            self._conns[worker] = None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        self.outstanding[worker] = 0
        self._on_message(encode_worker_dead(worker))

    def pick_worker(self) -> int | None:
        if self.num_workers == 1 and self._conns[0] is not None:  # the common case, once per request
            return 0
        now = time.monotonic()
        # Not any(genexpr): a generator left unfinished is closed by throwing GeneratorExit into it,
        # which costs more than the whole check (this runs for every request).
        any_connected = self._conns.count(None) < len(self._conns)
        for worker, conn in enumerate(self._conns):
            # Reconnect lazily (a restarted worker); at once when no worker is reachable at all.
            if conn is None and (not any_connected or now - self._last_attempt[worker] > _RECONNECT_EVERY_S):
                self._connect(worker)
        live = [w for w, c in enumerate(self._conns) if c is not None]
        if not live:
            raise NoWorkerAvailable("no inference worker is reachable")
        # Least outstanding in this API process; ties broken round-robin so idle workers share load.
        start = next(self._rr)
        return min(live, key=lambda w: (self.outstanding[w], (w - start) % self.num_workers))

    async def send(self, message: bytes, worker: int | None) -> None:
        conn = self._conns[worker] if worker is not None else None
        if conn is None:
            raise NoWorkerAvailable(f"inference worker {worker} is not reachable")
        self.outstanding[worker] += 1
        data = _frame(message)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise NoWorkerAvailable(f"inference worker {worker} went away: {exc}") from exc
        if sent < len(data):  # a large request: let the loop finish it as the socket drains
            await self._loop.sock_sendall(conn.sock, data[sent:])

    def done(self, worker: int | None) -> None:
        if worker is not None and self.outstanding[worker] > 0:
            self.outstanding[worker] -= 1

    async def close(self) -> None:
        for worker, conn in enumerate(self._conns):
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.sock.fileno())
                conn.sock.close()
                self._conns[worker] = None


class FastWorkerChannel(WorkerChannel):
    def __init__(self, folder: str, worker_id: int):
        path = _socket_path(folder, worker_id)
        with contextlib.suppress(FileNotFoundError):  # a restarted worker takes over its predecessor's path
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._by_reply: dict[str, _Connection] = {}
        self._reply_of: dict[int, str] = {}

    def recv(self, timeout_s: float) -> list[bytes]:
        # Round up: a sub-millisecond wait must block ~1 ms, not spin.
        timeout = math.ceil(timeout_s * 1000) / 1000 if timeout_s > 0 else 0
        out: list[bytes] = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._accept()
                continue
            conn: _Connection = key.data
            try:
                data = conn.sock.recv(_READ, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                continue
            conn.buffer += data
            for payload in _frames(conn.buffer):
                fd = conn.sock.fileno()
                if fd not in self._reply_of:  # the connection's first frame: the API process's reply id
                    reply = payload.decode()
                    self._reply_of[fd] = reply
                    self._by_reply[reply] = conn
                else:
                    out.append(payload)
        return out

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(True)  # reads use MSG_DONTWAIT; answers use a plain blocking sendall
            self._selector.register(sock, selectors.EVENT_READ, _Connection(sock))

    def _drop(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        reply = self._reply_of.pop(fd, None)
        if reply is not None and self._by_reply.get(reply) is conn:
            del self._by_reply[reply]
        with contextlib.suppress(Exception):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def send(self, reply_to: str | int, message: bytes) -> None:
        conn = self._by_reply.get(str(reply_to))
        if conn is None:  # that API process is gone: nobody is waiting for this answer
            return
        try:
            conn.sock.sendall(_frame(message))
        except OSError:
            self._drop(conn)

    def close(self) -> None:
        for key in list(self._selector.get_map().values()):
            with contextlib.suppress(Exception):
                key.fileobj.close()
        self._selector.close()


class FastChannelFactory(ChannelFactory):
    name = "fast"

    def __init__(self, num_workers: int):
        # 0700 by mkdtemp: only this user can connect to the workers' sockets.
        self.folder = tempfile.mkdtemp(prefix="hydraserve-ipc-")
        self.num_workers = num_workers
        self._owner = os.getpid()

    def api_channel(self, consumer_id: int) -> ApiChannel:
        return FastApiChannel(self.folder, self.num_workers)

    def worker_channel(self, worker_id: int) -> WorkerChannel:
        return FastWorkerChannel(self.folder, worker_id)

    def notify_api_processes(self, message: bytes, api_pids: list[int]) -> None:
        """Nothing to do: every API process sees a dead worker's sockets close (EOF) by itself."""

    def close(self) -> None:
        if os.getpid() == self._owner:
            shutil.rmtree(self.folder, ignore_errors=True)
