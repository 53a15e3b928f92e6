"""How a request and its answer cross the process boundary between API processes and workers.

Two implementations behind one interface (``server.transport``):

* ``fast`` (default): ZMQ ``ipc://`` sockets in a private 0700 folder. Each worker binds one PULL
  socket; each API process binds one PULL socket for answers. No manager process on the hot path,
  no polling: the API side awaits its socket in the asyncio loop, the worker blocks in ``poll``.
* ``litserve``: LitServe 0.2.19's stock path (a ``Manager().Queue()`` for requests and its
  ``MPQueueTransport`` for answers), kept for comparison.

Messages are orjson bytes (never pickle): requests ``{"id", "to", "items", "dl", "t", "tc"}``,
answers ``{"id", "out"}`` or ``{"id", "err": {"status", "error", "detail"}}``, and control
messages ``{"dead": worker_id}`` sent by the main process when a worker dies.
"""

from framework.transport.base import ApiChannel, ChannelFactory, WorkerChannel

__all__ = ["ApiChannel", "ChannelFactory", "WorkerChannel"]
