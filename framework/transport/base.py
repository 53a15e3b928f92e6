"""The transport interface: the factory lives in the main process and is pickled to every process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable


class NoWorkerAvailable(Exception):
    """No inference worker can take a request right now (all dead or restarting): a 503."""


class ApiChannel(ABC):
    """API-process side: send requests to workers, receive answers (one per API process)."""

    reply_to: str | int

    @abstractmethod
    async def start(self, on_message: Callable[[bytes], None]) -> None:
        """Open sockets and start delivering every incoming message to ``on_message``."""

    @abstractmethod
    def pick_worker(self) -> int | None:
        """The worker the next request goes to (``None`` when the transport decides itself)."""

    @abstractmethod
    async def send(self, message: bytes, worker: int | None) -> None: ...

    def done(self, worker: int | None) -> None:
        """A request sent to ``worker`` was answered (for least-outstanding routing)."""

    async def close(self) -> None: ...


class WorkerChannel(ABC):
    """Inference-worker side: receive requests, send answers."""

    @abstractmethod
    def recv(self, timeout_s: float) -> list[bytes]:
        """Block up to ``timeout_s`` for one message, then return it and every message already waiting."""

    @abstractmethod
    def send(self, reply_to: str | int, message: bytes) -> None: ...

    def close(self) -> None: ...


class ChannelFactory(ABC):
    """Created once in the main process; opens the per-process ends after fork/spawn."""

    name: str

    @abstractmethod
    def api_channel(self, consumer_id: int) -> ApiChannel: ...

    @abstractmethod
    def worker_channel(self, worker_id: int) -> WorkerChannel: ...

    @abstractmethod
    def notify_api_processes(self, message: bytes, api_pids: list[int]) -> None:
        """Main process -> every API process (e.g. a worker died)."""

    def close(self) -> None: ...
