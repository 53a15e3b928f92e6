"""Structured configs of the groups the framework owns (``server``, ``tracing``).

Plugin groups (model, quantization, batching, cache, hardware) are validated against each plugin's
own ``Config`` dataclass instead; see ``framework/config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRANSPORTS = ("fast", "litserve")
EXPORTERS = ("none", "console", "file", "otlp")
OTLP_PROTOCOLS = ("http/json", "http/protobuf", "grpc")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the user opens it up on purpose
    port: int = 8000
    num_api_servers: int = 1
    transport: str = "fast"  # "fast" (Unix sockets, no manager, no polling) or "litserve" (stock 0.2.19 path)
    max_body_bytes: int = 4 * 1024 * 1024
    api_key_env: str = "HYDRASERVE_API_KEY"  # when that variable is set, X-API-Key is required
    # Paths answered without the key when one is set (exact paths); everything else needs it.
    public_paths: list[str] = field(default_factory=lambda: ["/health"])
    timeout_ms: int = 30_000  # per-request deadline; a client may ask for less (X-Request-Timeout-Ms)
    max_queue: int = 512  # requests admitted but not answered, across API processes; then 503
    retry_after_s: int = 1
    restart_workers: bool = True
    # Slow or numerous clients (framework/connections.py): a request's headers must arrive within
    # header_timeout_s and its body within body_timeout_s after them (else 408); at most
    # max_connections open connections per API process (one more: 503); idle keep-alive connections
    # close after keep_alive_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    keep_alive_timeout_s: float = 5.0
    log_level: str = "info"
    access_log: bool = False  # one log line per request costs latency; turn on to debug
    startup_timeout_s: float = 600.0
    gc_freeze: bool = True  # after start-up, move every object to the GC's permanent generation
    gc_thresholds: list | None = field(default_factory=lambda: [20_000, 50, 100])  # gc.set_threshold; null: Python's

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.gc_thresholds is not None and (
                len(self.gc_thresholds) != 3 or not all(isinstance(v, int) and v > 0 for v in self.gc_thresholds)):
            out.append(("gc_thresholds", f"must be three positive integers like [20000, 50, 100] (see "
                        f"gc.set_threshold), or null for Python's defaults; got {self.gc_thresholds}"))
        bad_paths = [p for p in self.public_paths if not isinstance(p, str) or not p.startswith("/")]
        if bad_paths:
            out.append(("public_paths", f"every entry must be a path starting with '/' (e.g. /health), "
                        f"got {bad_paths}"))
        if self.transport not in TRANSPORTS:
            out.append(("transport", f"must be one of {', '.join(TRANSPORTS)}, got '{self.transport}'"))
        if not 1024 <= self.port <= 65535:
            out.append(("port", f"must be in 1024..65535, got {self.port}"))
        if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
            out.append(("host", f"must be '127.0.0.1', '0.0.0.0' or '::', got '{self.host}'"))
        for name in ("num_api_servers", "max_body_bytes", "timeout_ms", "max_queue", "header_timeout_s",
                     "body_timeout_s", "max_connections", "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        return out


@dataclass
class TracingConfig:
    exporter: str = "none"
    path: str = "traces.jsonl"  # file exporter: relative paths are under the run's output folder
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    protocol: str = "http/json"  # OTLP/HTTP with the bytes the file holds; http/protobuf converts them
    # OTLP request headers. null in conf/tracing/otlp.yaml, not {}: Hydra refuses new keys in an existing
    # dict (`tracing.headers={authorization: ...}` would be "not in struct"), but replaces a null.
    headers: dict[str, str] | None = None
    timeout_s: float = 10.0
    sample_ratio: float = 1.0
    service_name: str = "hydraserve"
    flush_interval_ms: int = 500  # spans leave the process in batches at least this often
    max_queue_size: int = 8192  # spans waiting for export; beyond it new spans are dropped, never blocked

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.exporter not in EXPORTERS:
            out.append(("exporter", f"must be one of {', '.join(EXPORTERS)}, got '{self.exporter}'"))
        if self.protocol not in OTLP_PROTOCOLS:
            out.append(("protocol", f"must be one of {', '.join(OTLP_PROTOCOLS)}, got '{self.protocol}'"))
        if not 0.0 <= self.sample_ratio <= 1.0:
            out.append(("sample_ratio", f"must be within [0, 1], got {self.sample_ratio}"))
        for name in ("flush_interval_ms", "max_queue_size", "timeout_s"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        grpc_with_path = self.protocol == "grpc" and self.endpoint.rstrip("/").endswith("/v1/traces")
        if self.exporter == "otlp" and grpc_with_path:
            out.append((
                "endpoint",
                f"gRPC takes host:port without a path (e.g. http://127.0.0.1:4317), got "
                f"'{self.endpoint}'; or set tracing.protocol=http/json",
            ))
        if self.exporter == "file" and not self.path:
            out.append(("path", "must name a file, e.g. traces.jsonl (relative to the run's output folder)"))
        return out
