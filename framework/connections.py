"""The connection layer's bounds on slow or numerous clients (uvicorn's httptools protocol, extended).

uvicorn (0.54 here) bounds only the idle time *between* requests (``timeout_keep_alive``): a
connection that opens and sends nothing, or sends its headers or body a byte at a time, is held for
ever, and every such connection costs a file descriptor and memory in the API process. This
subclass adds, per connection:

* ``server.header_timeout_s``: a request's headers must be complete this long after the connection
  opens (or after the request's first byte on a kept-alive connection); else 408 and the connection
  closes (silently if not a byte came).
* ``server.body_timeout_s``: the body must be complete this long after the headers. When it is not,
  the request is flagged (``BODY_TIMED_OUT`` in its ASGI scope) and woken; the gateway's body reader
  (``framework/http.py``) answers 408 with the JSON error body, and the connection closes after it.
  Cost: nothing for a request whose body arrives with its headers (the common case: no timer is armed).
* ``server.max_connections``: open connections per API process; one more is answered 503 (JSON,
  ``Retry-After``) at once and closed, so a flood of idle sockets cannot exhaust descriptors.

uvicorn internals relied on (tests/test_server_robustness.py exercises each against a real server):
``HttpToolsProtocol.connection_made / connection_lost / data_received / on_message_begin /
on_headers_complete / on_message_complete``, its ``connections``, ``transport``, ``loop`` and
``cycle``, and a cycle's ``scope``, ``more_body``, ``keep_alive``, ``message_event``, ``response_started``.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from framework import metrics

BODY_TIMED_OUT = "hydraserve.body_timed_out"  # ASGI scope key set on a request whose body stalled


def _raw_response(status: bytes, error: str, detail: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"error": error, "detail": detail})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n" + extra + b"\r\n" + body)


def bounded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int,
                     retry_after_s: int = 1) -> type[asyncio.Protocol]:
    """The ``http=`` protocol class for ``uvicorn.Config`` with these bounds."""

    too_many = _raw_response(b"503 Service Unavailable", "too many open connections; retry later",
                             f"this API process holds {max_connections} connections (server.max_connections)",
                             b"retry-after: " + str(retry_after_s).encode() + b"\r\n")
    header_408 = _raw_response(b"408 Request Timeout", "request headers timed out",
                               f"the request's headers did not arrive within {header_timeout_s} s "
                               "(server.header_timeout_s)")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _got_bytes = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                metrics.slow_client("connections")
                transport.write(too_many)
                transport.close()
                return
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        def _cancel_timers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            super().data_received(data)
            cycle = self.cycle
            # Headers parsed, body still coming: only now does the body get a timer.
            if (self._body_timer is None and cycle is not None and cycle.more_body and self._header_timer is None
                    and not cycle.response_started and not self.transport.is_closing()):
                self._body_timer = self.loop.call_later(body_timeout_s, self._body_late, cycle)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request on a kept-alive connection
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            metrics.slow_client("headers")
            if self._got_bytes:
                self.transport.write(header_408)
            self.transport.close()

        def _body_late(self, cycle) -> None:
            self._body_timer = None
            if cycle is not self.cycle or not cycle.more_body or cycle.response_started:
                return
            metrics.slow_client("body")
            # The gateway's reader sees the flag on its next receive and answers 408; the rest of
            # the body is never read, so the connection cannot be reused.
            cycle.scope[BODY_TIMED_OUT] = body_timeout_s
            cycle.keep_alive = False
            cycle.message_event.set()

    return BoundedHttpToolsProtocol
