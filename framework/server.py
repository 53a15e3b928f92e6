"""``HydraServer``: LitServer 0.2.19 with our transport, request path and endpoints.

What we keep from LitServe: spawning workers per device (``launch_inference_worker``), the
worker setup status, several forked API processes sharing one socket, graceful shutdown.
What we replace, and why:

* ``_init_manager``: the request queue and answer transport become a ``ChannelFactory`` (Unix
  sockets by default: no manager round trip, no helper threads, no polling); the Manager remains
  for setup status only.
* ``register_endpoints``: our ``Gateway`` (decode, cache, admission control, deadlines, tracing)
  on plain Starlette routes; no GZip middleware (it costs CPU on every embedding response).
* ``_start_worker_monitoring``: LitServe's monitor fails in-flight requests by scanning a response
  buffer that lives in the main process, where forked API processes never write. Ours restarts the
  worker; API processes on the fast path see the dead worker's sockets close and fail its
  in-flight requests at once with a clear 503 (the stock path is told through its transport).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from contextlib import asynccontextmanager
from multiprocessing.managers import SyncManager
from typing import Any

import litserve as ls
import orjson
from fastapi import FastAPI
from litserve.transport.factory import create_transport_from_config
from litserve.utils import WorkerSetupStatus
from starlette.requests import Request
from starlette.responses import Response

from framework import metrics
from framework.api import ComposedAPI
from framework.config import Resolved
from framework.http import Gateway, json_response
from framework.lifecycle import die_with_parent, gc_state
from framework.security import ApiKeyMiddleware, install_error_handlers, redact
from framework.transport.fast import FastChannelFactory
from framework.transport.stock import StockChannelFactory

log = logging.getLogger("hydraserve.server")


def skip_fastapi_telemetry(app: FastAPI) -> None:
    """Turn off FastAPI's built-in OpenTelemetry instrumentation: hydraserve traces requests itself,
    and FastAPI's check for a configured OpenTelemetry provider runs on every request (three provider
    look-ups and ``os.environ`` reads: 7.7 µs here, 0.14 µs once off; about 3% of an echo request's
    server CPU). A FastAPI without that instrumentation has no ``_telemetry`` and is left alone."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config.update(tracing=False, metrics=False, logs=False)


class HydraServer(ls.LitServer):
    def __init__(self, resolved: Resolved, output_dir: str):
        self.resolved = resolved
        self.output_dir = output_dir
        self.started_at = time.time()
        self._stopping = False  # set when a shutdown starts, so the monitor never restarts a worker then
        self.api = ComposedAPI(resolved.raw, output_dir)
        # Shared by every forked API process: admitted-but-unanswered requests (server.max_queue).
        self.admitted = mp.get_context("fork").Value("i", 0)
        hw = resolved.hardware
        super().__init__(
            self.api,
            accelerator=hw.accelerator(),
            devices=hw.devices(),
            workers_per_device=hw.workers_per_device(),
            timeout=False,  # deadlines are ours (server.timeout_ms), enforced per request
            restart_workers=resolved.server.restart_workers,
            # No /docs, /redoc, /openapi.json: every route is a plain Starlette one, absent from the
            # schema, so they documented nothing and only widened what a client can reach.
            disable_openapi_url=True,
        )
        skip_fastapi_telemetry(self.app)
        self.gateway: Gateway | None = None

    # --- transport ------------------------------------------------------------------------------
    def _init_manager(self, num_api_servers: int):
        manager = self._start_manager(num_api_servers)
        num_workers = len(self._inference_workers_config_for_api(self.api.api_path))
        if self.resolved.server.transport == "fast":
            self.factory = FastChannelFactory(num_workers)
        else:
            self.factory = StockChannelFactory(self.litapi_request_queues[self.api.api_path], self._transport)
        self.reports = manager.dict()
        self.api.loop.factory = self.factory
        self.api.loop.reports = self.reports
        self.gateway = Gateway(self.resolved, self.factory, self.admitted, self.output_dir)
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

    def run(self, *args, **kwargs):
        """LitServer.run with the connection bounds (framework/connections.py) as uvicorn's protocol;
        raises ``RuntimeError`` (the CLI exits non-zero) when the server stopped because a process died."""
        from framework.connections import bounded_protocol

        s = self.resolved.server
        kwargs.setdefault("http", bounded_protocol(s.header_timeout_s, s.body_timeout_s, s.max_connections,
                                                   s.retry_after_s))
        kwargs.setdefault("timeout_keep_alive", s.keep_alive_timeout_s)
        self._fatal: str | None = None
        super().run(*args, **kwargs)
        if self._fatal:
            raise RuntimeError(self._fatal)

    def verify_worker_status(self):
        deadline = time.monotonic() + self.resolved.server.startup_timeout_s
        while not any(v == WorkerSetupStatus.READY for v in self.workers_setup_status.values()):
            if any(v == WorkerSetupStatus.ERROR for v in self.workers_setup_status.values()):
                errors = [v for k, v in self.reports.items() if k.startswith("error-")]
                raise RuntimeError("an inference worker failed to start: " + ("; ".join(errors) or "see log above"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"no inference worker was ready after {self.resolved.server.startup_timeout_s} s "
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
            factory = getattr(self, "factory", None)
            if factory is not None:
                factory.close()

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

        def api_process_died() -> bool:
            for proc in api_procs:
                if proc.is_alive() or self._stopping:
                    continue
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
                    self.factory.notify_api_processes(orjson.dumps({"dead": idx}), api_pids)
                    if not self.restart_workers:
                        self._perform_graceful_shutdown(manager, uvicorn_workers, f"worker {idx} died")
                        return
                    self.inference_workers[idx] = self.launch_single_inference_worker(self.api, idx)
                    log.info("inference worker %d restarted", idx)
                time.sleep(0.2)

        threading.Thread(target=monitor, daemon=True, name="hydraserve-monitor").start()

    # --- HTTP -----------------------------------------------------------------------------------
    def _register_middleware(self):
        # LitServe appends GZipMiddleware; compressing every JSON answer costs latency on loopback.
        self.middlewares = [m for m in self.middlewares if not (isinstance(m, tuple) and m[0].__name__ ==
                                                                "GZipMiddleware")]
        super()._register_middleware()
        # Added last, so outermost: the API key guards every path, whatever registered it.
        server = self.resolved.server
        self.app.add_middleware(ApiKeyMiddleware, key=os.environ.get(server.api_key_env) or None,
                                public_paths=tuple(server.public_paths))
        install_error_handlers(self.app)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        gateway = self.gateway
        await gateway.start(app.response_queue_id or 0)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await gateway.stop()

    def register_endpoints(self):
        app = self.app

        async def predict(request: Request) -> Response:
            return await self.gateway.predict(request)

        async def embeddings(request: Request) -> Response:
            return await self.gateway.embeddings(request)

        async def health(request: Request) -> Response:
            status = dict(self.workers_setup_status) if getattr(self, "workers_setup_status", None) else {}
            ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
            return Response("ok" if ready else "not ready", status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "1"})

        async def info(request: Request) -> Response:
            return json_response(self.info())

        async def metrics_endpoint(request: Request) -> Response:
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

        app.add_route("/predict", predict, methods=["POST"])
        if self.resolved.model.task == "embedding":
            app.add_route("/v1/embeddings", embeddings, methods=["POST"])
        app.add_route("/health", health, methods=["GET"])
        app.add_route(self.info_path, info, methods=["GET"])
        app.add_route("/metrics", metrics_endpoint, methods=["GET"])

    def info(self) -> dict[str, Any]:
        from framework import __version__
        from framework.versions import plugin_versions

        reports = dict(self.reports) if getattr(self, "reports", None) is not None else {}
        engine = [orjson.loads(v) for k, v in sorted(reports.items()) if k.startswith("worker-")]
        return redact({  # a secret in the config (tracing.headers, a URL's password) never leaves
            "hydraserve": __version__,
            "config": self.resolved.raw,
            "plugins": plugin_versions(self.resolved),
            "model": self.resolved.model.identity(),
            "engine": engine,
            "errors": [v for k, v in reports.items() if k.startswith("error-")],
            "transport": self.resolved.server.transport,
            "api_process": {"pid": os.getpid(), "gc": gc_state()},
            "uptime_s": round(time.time() - self.started_at, 3),
        })
