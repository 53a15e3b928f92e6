"""Two HTTP/1.1 clients for the load generator, both keep-alive with one request in flight per connection.

``raw`` speaks HTTP/1.1 straight over asyncio streams: on a 2-core machine it drives several times
the rate httpx can (docs/bench.md, "The load generator's own limits", has the measurement) so the
client is not what limits the numbers. ``httpx`` is the well-trodden alternative (``bench.client=httpx``).

Only loopback targets are accepted: this is a benchmark for the local machine, not a load tool for
other people's servers.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
LOOPBACK_NAMES = ("localhost",)


class HttpProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 this client understands."""


def split_url(url: str) -> tuple[str, int, str]:
    """``http://127.0.0.1:8000/x`` -> (host, port, base path); refuses non-loopback hosts."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url!r}: only http:// loopback URLs are supported (e.g. http://127.0.0.1:8000)")
    host = parts.hostname or ""
    if not is_loopback(host):
        raise ValueError(f"{url!r}: the load generator only targets this machine; use 127.0.0.1, ::1 "
                         "or localhost")
    return host, parts.port or 80, parts.path.rstrip("/")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RawConnection:
    """One keep-alive HTTP/1.1 connection; reconnects lazily after an error or ``Connection: close``."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port,
                                                                   limit=MAX_HEADER_BYTES)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {len(body)}"]
        if body:
            head.append("Content-Type: application/json")
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        reused = self._writer is not None
        try:
            return await self._exchange(payload)
        except (ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
        # A kept-alive connection the server closed while idle: one retry on a fresh connection.
        return await self._exchange(payload)

    async def request_streaming(self, method: str, path: str, body: bytes, headers: dict[str, str] | None,
                                on_data: Callable[[bytes], None]) -> tuple[int, dict[str, str]]:
        """Like ``request``, but hands each piece of the body to ``on_data`` as it arrives (chunked,
        Content-Length or close-delimited), so a server-sent-events reader can time every event.
        No retry on a reset: part of the stream may already have been consumed."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {len(body)}",
                "Accept: text/event-stream"]
        if body:
            head.append("Content-Type: application/json")
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(payload)
            status, resp_headers = await self._read_head(self._reader)
            await self._stream_body(self._reader, status, resp_headers, on_data)
        except BaseException:
            self.close()
            raise
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return status, resp_headers

    @staticmethod
    async def _stream_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str],
                           on_data: Callable[[bytes], None]) -> None:
        if "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                piece = await reader.read(min(left, 65536))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                on_data(piece)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return
                while size > 0:  # hand over what has arrived: a large chunk may come in pieces
                    piece = await reader.read(min(size, 65536))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", size)
                    size -= len(piece)
                    on_data(piece)
                await reader.readexactly(2)
        elif status in (204, 304) or 100 <= status < 200:
            return
        else:
            headers["connection"] = "close"
            while piece := await reader.read(65536):
                on_data(piece)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("server closed the connection") from exc
        except asyncio.LimitOverrunError as exc:
            raise HttpProtocolError("response headers larger than 64 KiB") from exc
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpProtocolError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _exchange(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(payload)
            status, resp_headers, data = await self._read_response(self._reader)
        except BaseException:
            self.close()  # the connection's state is unknown now: never reuse it
            raise
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return status, resp_headers, data

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        status, headers = await RawConnection._read_head(reader)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_BODY_BYTES:
                raise HttpProtocolError(f"response body of {length} bytes is larger than the 64 MiB limit")
            data = await reader.readexactly(length) if length else b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = await RawConnection._read_chunked(reader)
        elif status in (204, 304) or 100 <= status < 200:
            data = b""
        else:  # no length: the body ends when the server closes the connection
            data = await reader.read(MAX_BODY_BYTES)
            headers["connection"] = "close"
        return status, headers, data

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks, total = [], 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, bounded by the stream limit
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpProtocolError("chunked response body larger than the 64 MiB limit")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)


class RawClient:
    """A fixed pool of ``RawConnection``: each load worker owns one connection."""

    def __init__(self, base_url: str):
        self.host, self.port, self.base_path = split_url(base_url)

    def connection(self) -> RawConnection:
        return RawConnection(self.host, self.port)

    async def aclose(self) -> None:
        pass


class HttpxConnection:
    """The httpx equivalent of ``RawConnection`` (the shared client pools the connections)."""

    def __init__(self, client):
        self._client = client

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"content-type": "application/json", **(headers or {})} if body else dict(headers or {})
        resp = await self._client.request(method, path, content=body or None, headers=hdrs)
        return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content

    async def request_streaming(self, method: str, path: str, body: bytes, headers: dict[str, str] | None,
                                on_data: Callable[[bytes], None]) -> tuple[int, dict[str, str]]:
        hdrs = {"content-type": "application/json", "accept": "text/event-stream", **(headers or {})}
        async with self._client.stream(method, path, content=body or None, headers=hdrs) as resp:
            async for piece in resp.aiter_raw():
                on_data(piece)
            return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}

    def close(self) -> None:
        pass


class HttpxClient:
    def __init__(self, base_url: str, connections: int, timeout_s: float):
        import httpx

        split_url(base_url)  # the loopback check
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s,
                                         trust_env=False)
        self.base_path = ""

    def connection(self) -> HttpxConnection:
        return HttpxConnection(self._client)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_client(kind: str, base_url: str, connections: int, timeout_s: float):
    if kind == "raw":
        return RawClient(base_url)
    if kind == "httpx":
        return HttpxClient(base_url, connections, timeout_s)
    raise ValueError(f"bench.client: must be 'raw' or 'httpx', got {kind!r}")


async def get_json(base_url: str, path: str, timeout_s: float = 5.0) -> tuple[int, object]:
    """One GET on a fresh connection (``/health``, ``/info``); returns (status, parsed JSON or text)."""
    import json

    host, port, base = split_url(base_url)
    conn = RawConnection(host, port)
    try:
        status, _, data = await asyncio.wait_for(conn.request("GET", base + path), timeout_s)
    finally:
        conn.close()
    try:
        return status, json.loads(data or b"null")
    except ValueError:
        return status, data.decode("utf-8", "replace")
