"""The one module that touches LitServe 0.2.19 beyond its public API.

hydraserve uses LitServe for what it does well and replaces what costs latency or hides failures.

Used as LitServe does it: spawning one inference worker per device slot
(``launch_inference_worker``, the LitAPI pickled into it), the workers' setup status and readiness,
forking several API (uvicorn) processes that share one listening socket, and graceful shutdown.

Replaced, through the private hooks overridden here (each one listed in ``INTERNALS``, and
``tests/test_litserve_contract.py`` checks that every one still exists with the signature relied on,
so a newer LitServe fails loudly in one place):

* ``_init_manager``: the request queue and answer transport become hydraserve's channels (Unix
  sockets by default: no manager round trip, no helper threads, no polling). The Manager process
  stays for setup status only, and dies with the server (it inherits the listening socket).
* ``_register_middleware``: no GZip (it costs CPU on every embedding response), plus the server's
  own middleware, outermost.
* ``_start_worker_monitoring``: LitServe's monitor fails in-flight requests by scanning a response
  buffer that lives in the main process, where forked API processes never write. Ours restarts a
  dead worker and tells the API processes at once; a dead API process stops the whole server.
* ``_perform_graceful_shutdown``: marks the shutdown first, so the monitor never mistakes the
  workers it terminates for crashes, then lets the server close its channels.
* ``verify_worker_status``: bounded by ``server.startup_timeout_s``, and fails with the worker's
  own error instead of waiting forever.

``LitServerAdapter`` turns these into hydraserve-named hooks (``create_channels``,
``add_middleware``, ``worker_died``, ``on_shutdown``...) that ``framework/server.py`` implements
without knowing LitServe's internals. ``HydraLoopBase`` is the worker side: LitServe calls a
loop's ``__call__`` with its own arguments in each spawned worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing as mp
import signal
import threading
import time
from multiprocessing.managers import SyncManager
from typing import Any

import litserve as ls
from litserve.loops.base import LitLoop
from litserve.transport.factory import create_transport_from_config
from litserve.utils import WorkerSetupStatus

from framework.lifecycle import die_with_parent, stop_requested

log = logging.getLogger("hydraserve.server")

#: Every LitServe name used here beyond its public API: (owner, name, the parameters relied on;
#: None for an attribute set in ``__init__``). tests/test_litserve_contract.py checks each one.
INTERNALS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("LitServer", "_init_manager", ("self", "num_api_servers")),
    ("LitServer", "_register_middleware", ("self",)),
    ("LitServer", "_start_worker_monitoring", ("self", "manager", "uvicorn_workers")),
    ("LitServer", "_perform_graceful_shutdown", ("self", "manager", "uvicorn_workers", "shutdown_reason")),
    ("LitServer", "verify_worker_status", ("self",)),
    ("LitServer", "_inference_workers_config_for_api", ("self", "api_path")),
    ("LitServer", "launch_single_inference_worker", ("self", "lit_api", "worker_id")),
    ("LitServer", "lifespan", ("self", "app")),
    ("LitServer", "register_endpoints", ("self",)),
    ("instance", "transport_config", None),
    ("instance", "litapi_connector", None),
    ("instance", "litapi_request_queues", None),
    ("instance", "_logger_connector", None),
    ("instance", "middlewares", None),
    ("instance", "inference_workers", None),
    ("instance", "restart_workers", None),
    ("app", "response_queue_id", None),
    ("LitLoop", "__call__", ("self", "lit_api", "device", "worker_id", "request_queue", "transport",
                             "workers_setup_status", "callback_runner")),
    ("LitLoop", "pre_setup", ("self", "lit_api", "spec")),
    ("module", "litserve.transport.factory.create_transport_from_config", None),
    ("module", "litserve.utils.WorkerSetupStatus", None),
    ("module", "litserve.server._MCP_AVAILABLE", None),
)

# LitServe 0.2.19 turns its MCP endpoint on when the ``mcp`` package is importable, but defines the
# names it builds it from only when ``fastmcp`` is importable too: with ``mcp`` alone (vLLM depends on
# it, so ``hydraserve[vllm]`` installs it) every start fails with ``NameError: MCPServer``.
# hydraserve registers no MCP endpoints, so it is off unless LitServe could actually build one.
if importlib.util.find_spec("fastmcp") is None:
    import litserve.server as _litserve_server

    _litserve_server._MCP_AVAILABLE = False


class HydraLoopBase(LitLoop):
    """A LitServe loop whose worker runs ``serve(lit_api, device, worker_id)`` (hydraserve's own loop)."""

    def pre_setup(self, lit_api: ls.LitAPI, spec: Any = None) -> None:
        pass

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner) -> None:  # LitServe's signature (INTERNALS)
        self.serve(lit_api, device, worker_id)

    def serve(self, lit_api: ls.LitAPI, device: Any, worker_id: int) -> None:
        raise NotImplementedError


class LitServerAdapter(ls.LitServer):
    """LitServer with its private hooks turned into hydraserve's. Subclasses implement the hooks."""

    startup_timeout_s: float = 600.0
    _stopping = False  # set when a shutdown starts, so the monitor never restarts a worker then
    _fatal: str | None = None  # why the server stopped on its own (a dead API process)

    # --- hooks for the subclass -----------------------------------------------------------------
    def create_channels(self, manager: SyncManager, num_workers: int, stock_queue: Any, stock_transport: Any) -> None:
        """Build the request/answer channels once the Manager exists, before any process starts."""

    def add_middleware(self, app: Any) -> None:
        """Add the server's own middleware; it wraps LitServe's (outermost)."""

    def worker_died(self, index: int, api_pids: list[int]) -> None:
        """An inference worker died (it is restarted afterwards if ``restart_workers``)."""

    def worker_errors(self) -> list[str]:
        """The start-up errors the workers reported, for ``verify_worker_status``'s message."""
        return []

    def on_shutdown(self) -> None:
        """The server is stopping (after LitServe's own shutdown)."""

    # --- what the subclass may read -------------------------------------------------------------
    def workers_ready(self) -> bool:
        status = dict(self.workers_setup_status) if getattr(self, "workers_setup_status", None) else {}
        return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())

    @property
    def stopping(self) -> bool:
        return self._stopping

    @staticmethod
    def api_process_index(app: Any) -> int:
        """Which API process (0..num_api_servers-1) serves ``app``: LitServe sets it on each fork's app."""
        return getattr(app, "response_queue_id", None) or 0

    # --- LitServe's private hooks (INTERNALS) ---------------------------------------------------
    def _init_manager(self, num_api_servers: int):
        manager = self._start_manager(num_api_servers)
        lit_api = next(iter(self.litapi_connector))
        num_workers = len(self._inference_workers_config_for_api(lit_api.api_path))
        self.create_channels(manager, num_workers, self.litapi_request_queues[lit_api.api_path], self._transport)
        return manager

    def _start_manager(self, num_api_servers: int) -> SyncManager:
        """LitServe 0.2.19's ``_init_manager``, except that the Manager process dies with the server.

        It is forked after the listening socket is bound, so it inherits that socket: left alive by
        a SIGKILLed main process, it would keep the port bound and swallow connections.
        """
        manager = SyncManager(ctx=mp.get_context())
        manager.start(initializer=die_with_parent)
        self.transport_config.manager = manager
        self.transport_config.num_consumers = num_api_servers
        self.workers_setup_status = manager.dict()
        self._shutdown_event = manager.Event()
        for lit_api in self.litapi_connector:
            self.litapi_request_queues[lit_api.api_path] = manager.Queue()
        if self._logger_connector._loggers:
            self.logger_queue = manager.Queue()
        self._logger_connector.run(self)
        self._transport = create_transport_from_config(self.transport_config)
        return manager

    def _register_middleware(self):
        # LitServe appends GZipMiddleware; compressing every JSON answer costs latency on loopback.
        self.middlewares = [m for m in self.middlewares if not (isinstance(m, tuple) and m[0].__name__ ==
                                                                "GZipMiddleware")]
        super()._register_middleware()
        self.add_middleware(self.app)

    def verify_worker_status(self):
        deadline = time.monotonic() + self.startup_timeout_s
        while not any(v == WorkerSetupStatus.READY for v in self.workers_setup_status.values()):
            if any(v == WorkerSetupStatus.ERROR for v in self.workers_setup_status.values()):
                errors = self.worker_errors()
                raise RuntimeError("an inference worker failed to start: " + ("; ".join(errors) or "see log above"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"no inference worker was ready after {self.startup_timeout_s} s "
                                   "(server.startup_timeout_s)")
            time.sleep(0.05)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal"):
        # Set first: workers terminated by the shutdown must not look like crashes to the monitor
        # (it would restart them, or start a second shutdown). A plain flag: after Ctrl-C/SIGTERM the
        # main thread's connection to the Manager (behind _shutdown_event) may be mid-call and unusable.
        self._stopping = True
        try:
            super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)
        finally:
            self.on_shutdown()

    def _start_worker_monitoring(self, manager, uvicorn_workers):
        """Watch the inference workers (restarted when they die) and the API processes.

        A dead API (uvicorn) process stops the whole server, loudly and at once (non-zero exit), for
        a supervisor to restart: it is not restarted in place. Its listening socket is shared with
        the main process, so nothing refuses connections: they pile up in the backlog and every
        request, ``/health`` included, hangs. A replacement would have to be forked from this
        multi-threaded main process mid-run, and the dead process took its admission slots
        (``server.max_queue``, shared) and in-flight requests with it, unaccounted; a process killed
        by SIGKILL (the OOM killer) is rare and severe enough that a clean restart of everything is
        the robust answer. Stopping within ~0.2 s also closes the socket, so clients see refused
        connections instead of hanging.
        """
        api_pids = [w.pid for w in uvicorn_workers.values() if getattr(w, "pid", None)]
        api_procs = [w for w in uvicorn_workers.values() if hasattr(w, "exitcode")]  # processes, not threads
        clean_exits = (0, -signal.SIGTERM, -signal.SIGINT)

        def api_process_died() -> bool:
            for proc in api_procs:
                if proc.is_alive() or self._stopping:
                    continue
                # A stop sent to the whole process group ends the API processes first; the main thread's
                # handler sets stop_requested within moments of the same signal: our own stop, not a crash.
                if proc.exitcode in clean_exits and stop_requested.wait(1.0):
                    return True
                self._fatal = (f"API process {proc.name} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                               "stopping the server (its port would otherwise hang every request)")
                log.critical("%s", self._fatal)
                self._stopping = True
                with contextlib.suppress(Exception):
                    self._shutdown_event.set()  # the main thread's wait returns; run() shuts down and raises
                return True
            return False

        def monitor() -> None:
            while not self._stopping and not self._shutdown_event.is_set():
                if api_process_died():
                    return
                for idx, proc in enumerate(self.inference_workers):
                    if proc.is_alive() or self._stopping:
                        continue
                    log.error("inference worker %d (pid %s) died with exit code %s", idx, proc.pid, proc.exitcode)
                    self.worker_died(idx, api_pids)
                    if not self.restart_workers:
                        self._perform_graceful_shutdown(manager, uvicorn_workers, f"worker {idx} died")
                        return
                    self.inference_workers[idx] = self.launch_single_inference_worker(
                        next(iter(self.litapi_connector)), idx)
                    log.info("inference worker %d restarted", idx)
                time.sleep(0.2)

        threading.Thread(target=monitor, daemon=True, name="hydraserve-monitor").start()
