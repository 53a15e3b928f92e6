"""``HydraServer``: the composed server, on LitServe through ``framework/litserve_adapter.py``.

It builds the channels (``server.transport``), the ``Gateway`` each API process starts, the
middleware (API key, error bodies, connection bounds) and the endpoints, and answers ``/info``.
Which LitServe parts it uses and which it replaces, and why, is the adapter's docstring: nothing
here touches LitServe beyond its public API.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from framework import metrics
from framework.api import ComposedAPI
from framework.config import Resolved
from framework.http import Gateway, json_response
from framework.lifecycle import gc_state
from framework.litserve_adapter import LitServerAdapter
from framework.security import ApiKeyMiddleware, install_error_handlers, redact
from framework.transport.fast import FastChannelFactory
from framework.transport.protocol import encode_worker_dead
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


class HydraServer(LitServerAdapter):
    def __init__(self, resolved: Resolved, output_dir: str):
        self.resolved = resolved
        self.output_dir = output_dir
        self.started_at = time.time()
        self.startup_timeout_s = resolved.server.startup_timeout_s
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

    # --- the adapter's hooks ------------------------------------------------------------------
    def create_channels(self, manager, num_workers: int, stock_queue: Any, stock_transport: Any) -> None:
        if self.resolved.server.transport == "fast":
            self.factory = FastChannelFactory(num_workers)
        else:
            self.factory = StockChannelFactory(stock_queue, stock_transport)
        self.reports = manager.dict()
        self.api.loop.factory = self.factory
        self.api.loop.reports = self.reports
        self.gateway = Gateway(self.resolved, self.factory, self.admitted, self.output_dir)

    def add_middleware(self, app: Any) -> None:
        # Outermost: the API key guards every path, whatever registered it.
        server = self.resolved.server
        app.add_middleware(ApiKeyMiddleware, key=os.environ.get(server.api_key_env) or None,
                           public_paths=tuple(server.public_paths))
        install_error_handlers(app)

    def worker_died(self, index: int, api_pids: list[int]) -> None:
        self.factory.notify_api_processes(encode_worker_dead(index), api_pids)

    def worker_errors(self) -> list[str]:
        return [v for k, v in self.reports.items() if k.startswith("error-")]

    def on_shutdown(self) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.close()

    def run(self, *args, **kwargs):
        """LitServer.run with the connection bounds (framework/connections.py) as uvicorn's protocol;
        raises ``RuntimeError`` (the CLI exits non-zero) when the server stopped because a process died."""
        from framework.connections import bounded_protocol

        s = self.resolved.server
        kwargs.setdefault("http", bounded_protocol(s.header_timeout_s, s.body_timeout_s, s.max_connections,
                                                   s.retry_after_s))
        kwargs.setdefault("timeout_keep_alive", s.keep_alive_timeout_s)
        self._fatal = None
        super().run(*args, **kwargs)
        if self._fatal:
            raise RuntimeError(self._fatal)

    # --- HTTP -----------------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        gateway = self.gateway
        await gateway.start(self.api_process_index(app))
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
            ready = self.workers_ready()
            return Response("ok" if ready else "not ready", status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "1"})

        async def info(request: Request) -> Response:
            return json_response(self.info())

        async def metrics_endpoint(request: Request) -> Response:
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

        if self.resolved.model.task == "chat":  # a generative model answers on OpenAI's routes only
            from framework.openai_routes import CHAT, COMPLETIONS, MODELS

            async def chat(request: Request) -> Response:
                return await self.gateway.generation.chat(request)

            async def completions(request: Request) -> Response:
                return await self.gateway.generation.completions(request)

            async def models(request: Request) -> Response:
                return await self.gateway.generation.models(request)

            app.add_route(CHAT, chat, methods=["POST"])
            app.add_route(COMPLETIONS, completions, methods=["POST"])
            app.add_route(MODELS, models, methods=["GET"])
        else:
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
