"""A client that starts its own trace and sends it to hydraserve in a W3C ``traceparent`` header.

The server's spans join the client's trace, so one trace id follows the request from the client,
through the API process, into the inference worker and back. Start a server that writes traces::

    hydraserve serve model=echo tracing=file hydra.run.dir=outputs/traced

then run this client and look the request up::

    python examples/traced_client.py                      # client spans on the console
    python examples/traced_client.py --exporter file --file client_traces.jsonl
    hydraserve traces outputs/traced --trace-id <printed trace id>

Only OpenTelemetry and httpx are used here: any client (Go, Java, curl with a hand-written
``traceparent``) does the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


def make_tracer(exporter: str, path: str) -> tuple[TracerProvider, object]:
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-client"}))
    if exporter == "file":
        # The server's JSON-lines exporter, so `hydraserve traces` can read the client's side too.
        try:
            from framework.tracing import JsonLinesSpanExporter
        except ImportError:  # run from a checkout without `pip install -e .`
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from framework.tracing import JsonLinesSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider, provider.get_tracer("traced-client")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    p.add_argument("--input", default="hello")
    p.add_argument("--exporter", choices=("console", "file"), default="console")
    p.add_argument("--file", default="client_traces.jsonl", help="with --exporter file")
    p.add_argument("--requests", type=int, default=1, help="requests sent in the same client trace")
    args = p.parse_args(argv)

    provider, tracer = make_tracer(args.exporter, args.file)
    propagator = TraceContextTextMapPropagator()
    try:
        with tracer.start_as_current_span("client request", kind=SpanKind.CLIENT) as span, \
                httpx.Client(timeout=30.0) as client:
            for _ in range(args.requests):
                headers: dict[str, str] = {}
                propagator.inject(headers)  # traceparent of the current (client) span
                response = client.post(args.url, json={"input": args.input}, headers=headers)
                print(f"HTTP {response.status_code}: {response.text[:200]}")
                print(f"sent      traceparent: {headers['traceparent']}")
                answered = response.headers.get("traceparent", "(none: is the server on tracing=none?)")
                print(f"server's  traceparent: {answered}")
            trace_id = f"{span.get_span_context().trace_id:032x}"
    except httpx.HTTPError as exc:
        print(f"cannot reach {args.url}: {exc}. Start `hydraserve serve model=echo tracing=file` first.",
              file=sys.stderr)
        return 1
    finally:
        provider.shutdown()
    print(f"\ntrace id: {trace_id}")
    print(f"look it up: hydraserve traces outputs/ --trace-id {trace_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
