"""How a request and its answer cross the process boundary between API processes and workers.

Two implementations behind one interface (``server.transport``):

* ``fast`` (default): one Unix stream socket per (API process, worker) pair in a private 0700
  folder, length-prefixed frames. No manager process and no helper threads on the hot path, no
  polling: the API side reads in its asyncio loop's reader callbacks, the worker blocks in
  ``select``. A worker's death is seen as EOF by every API process at once.
* ``litserve``: LitServe 0.2.19's stock path (a ``Manager().Queue()`` for requests and its
  ``MPQueueTransport`` for answers), kept for comparison.

Messages are orjson bytes (never pickle): requests ``{"id", "to", "items", "dl", "t"}`` (plus
``"s"`` if the request's trace is sampled), answers ``{"id", "out"}`` or
``{"id", "err": {"status", "error", "detail"}}`` (for a sampled request followed by a newline and
the worker's spans as a JSON array), and control messages ``{"dead": worker_id}`` when a worker dies.
"""

from framework.transport.base import ApiChannel, ChannelFactory, NoWorkerAvailable, WorkerChannel

__all__ = ["ApiChannel", "ChannelFactory", "NoWorkerAvailable", "WorkerChannel"]
