"""How a request and its answer cross the process boundary between API processes and workers.

Two implementations behind one interface (``server.transport``):

* ``fast`` (default): one Unix stream socket per (API process, worker) pair in a private 0700
  folder, length-prefixed frames. No manager process and no helper threads on the hot path, no
  polling: the API side reads in its asyncio loop's reader callbacks, the worker blocks in
  ``select``. A worker's death is seen as EOF by every API process at once.
* ``litserve``: LitServe 0.2.19's stock path (a ``Manager().Queue()`` for requests and its
  ``MPQueueTransport`` for answers), kept for comparison.

A transport moves frames as opaque bytes; what a frame holds (requests, cancels, answers, errors,
stream chunks, span trailers, worker-dead notices) is ``framework/transport/protocol.py``'s alone.
"""

from framework.transport.base import ApiChannel, ChannelFactory, NoWorkerAvailable, WorkerChannel

__all__ = ["ApiChannel", "ChannelFactory", "NoWorkerAvailable", "WorkerChannel"]
