"""``hydraserve traces``: where did the time of a request go? A waterfall from the file exporter's spans.

Reads the OTLP/JSON lines written by ``tracing=file`` (one ``TracesData`` a line, chunks of spans
from every process of the server), picks the slowest requests (root SERVER spans: no parent in the
file, or a remote parent such as a client's ``traceparent``) and prints each as a waterfall: one
line per span, indented by depth, with its offset from the request's start, its duration and a bar
on a shared time axis.
Spans of another trace that link to a span shown are listed under it, marked ``~``.

    hydraserve traces outputs/                    # newest traces.jsonl below the folder, 5 slowest
    hydraserve traces traces.jsonl --top 10
    hydraserve traces traces.jsonl --trace-id 4bf92f35 --png waterfall.png
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SHOWN_ATTRIBUTES = ("http.response.status_code", "batch.size", "cache.result", "error.type")


@dataclass
class Row:
    span: dict[str, Any]
    depth: int
    linked: bool = False  # from another trace, through a span link


@dataclass
class Request:
    """A root span and its rows; ``end_ns`` is the latest end among them (a late worker span too)."""

    root: dict[str, Any]
    rows: list[Row]

    def __post_init__(self) -> None:
        self.trace_id, self.start_ns, self.duration_ns = self.root["trace_id"], self.root["start_ns"], \
            _duration(self.root)
        self.end_ns = max([r.span["end_ns"] for r in self.rows] or [self.root["end_ns"]])


# ----------------------------------------------------------------------------------------------- input


def resolve_file(path: str | Path) -> Path:
    """``path`` itself, or the newest ``traces.jsonl`` below it when it is a folder."""
    p = Path(path)
    if p.is_dir():
        found = [f for f in p.rglob("traces.jsonl") if f.is_file()]
        if not found:
            raise FileNotFoundError(f"no traces.jsonl below {p}; serve with tracing=file first")
        return max(found, key=lambda f: f.stat().st_mtime)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return p


_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(v: dict) -> Any:
    """An OTLP/JSON ``AnyValue`` as a Python value (64-bit integers arrive as strings)."""
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values") or ()]
    if "kvlistValue" in v:
        return attributes_of(v["kvlistValue"].get("values"))
    return next(iter(v.values()), None)  # stringValue, boolValue, doubleValue, bytesValue


def attributes_of(kvs: list | None) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value") or {}) for kv in kvs or ()}


def span_of(s: dict, resource: dict, scope: str) -> dict[str, Any]:
    """One OTLP/JSON span as the flat dict the viewer (and ``tests/otlp_receiver.py``) works with."""
    status = s.get("status") or {}
    return {
        "trace_id": s["traceId"], "span_id": s["spanId"], "parent_span_id": s.get("parentSpanId") or None,
        "trace_state": s.get("traceState"),
        "name": s.get("name", "?"), "kind": _KINDS.get(s.get("kind"), str(s.get("kind"))),
        "start_ns": int(s["startTimeUnixNano"]), "end_ns": int(s["endTimeUnixNano"]),
        "attributes": attributes_of(s.get("attributes")),
        "status": {"code": _STATUS.get(status.get("code", 0), "UNSET"), "description": status.get("message") or None},
        "events": [{"name": e.get("name"), "time_ns": int(e.get("timeUnixNano", 0)),
                    "attributes": attributes_of(e.get("attributes"))} for e in s.get("events") or ()],
        "links": [{"trace_id": ln["traceId"], "span_id": ln["spanId"],
                   "attributes": attributes_of(ln.get("attributes"))} for ln in s.get("links") or ()],
        "resource": resource, "scope": scope,
    }


def spans_of_traces_data(data: dict) -> list[dict[str, Any]]:
    """The spans of an OTLP/JSON ``TracesData`` (a line of ``traces.jsonl``, or an OTLP/HTTP body)."""
    out = []
    for rs in data.get("resourceSpans") or ():
        resource = attributes_of((rs.get("resource") or {}).get("attributes"))
        for ss in rs.get("scopeSpans") or ():
            scope = (ss.get("scope") or {}).get("name", "")
            for s in ss.get("spans") or ():
                with contextlib.suppress(KeyError, TypeError, ValueError):  # a malformed span is skipped
                    out.append(span_of(s, resource, scope))
    return out


def spans_of_line(line: bytes) -> list[dict[str, Any]]:
    """The spans of one line of a ``tracing=file`` output (one OTLP/JSON ``TracesData``, as the
    OpenTelemetry Collector's file exporter writes); a torn or foreign line gives none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return []
    return spans_of_traces_data(obj) if isinstance(obj, dict) else []


def load_spans(path: str | Path) -> list[dict[str, Any]]:
    """Every span of every complete line of ``path``; a torn last line (a writer mid-flush) is skipped."""
    spans = []
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                spans.extend(spans_of_line(line))
    return spans


# -------------------------------------------------------------------------------------------- structure


def _duration(span: dict[str, Any]) -> int:
    return max(0, (span.get("end_ns") or 0) - (span.get("start_ns") or 0))


class Index:
    """Spans grouped by trace, children by parent, and span links reversed (who links to a span)."""

    def __init__(self, spans: Iterable[dict[str, Any]]) -> None:
        self.by_trace: dict[str, list[dict]] = defaultdict(list)
        self.children: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.linked_from: dict[tuple[str, str], list[dict]] = defaultdict(list)
        ids: set[tuple[str, str]] = set()
        spans = list(spans)
        for s in spans:
            self.by_trace[s["trace_id"]].append(s)
            ids.add((s["trace_id"], s["span_id"]))
        self.orphans: list[dict] = []  # parent absent from the file (or no parent): candidate roots
        for s in spans:
            parent = s.get("parent_span_id")
            if parent and (s["trace_id"], parent) in ids:
                self.children[(s["trace_id"], parent)].append(s)
            else:
                self.orphans.append(s)
            for link in s.get("links") or ():
                self.linked_from[(link["trace_id"], link["span_id"])].append(s)
        for group in (*self.children.values(), *self.linked_from.values()):
            group.sort(key=lambda s: s["start_ns"])

    def requests(self, trace_id: str | None = None) -> list[Request]:
        """Root SERVER spans (or, in a trace without one, its top spans) as requests with their rows."""
        roots = [s for s in self.orphans if trace_id is None or s["trace_id"] == trace_id]
        # Server spans are the requests; a span that merely lost its parent, or a batch span in a
        # trace of its own (linked from requests), is not. Without any server span (a client's own
        # file, a worker-only file), every top span is shown instead.
        servers = [s for s in roots if s.get("kind") == "SERVER"]
        return [Request(root=s, rows=self.rows(s)) for s in (servers or roots)]

    def rows(self, root: dict[str, Any]) -> list[Row]:
        out: list[Row] = []
        seen: set[tuple[str, str]] = set()

        def visit(span: dict, depth: int, linked: bool) -> None:
            key = (span["trace_id"], span["span_id"])
            if key in seen:  # a malformed file could hold a cycle
                return
            seen.add(key)
            out.append(Row(span, depth, linked))
            for child in self.children.get(key, ()):
                visit(child, depth + 1, linked)
            for other in self.linked_from.get(key, ()):
                visit(other, depth + 1, True)

        visit(root, 0, False)
        return out


def slowest(requests: list[Request], top: int) -> list[Request]:
    return sorted(requests, key=lambda r: r.duration_ns, reverse=True)[: max(top, 0)]


# ---------------------------------------------------------------------------------------------- output


def _label(row: Row) -> str:
    return "  " * row.depth + ("~ " if row.linked else "") + str(row.span.get("name", "?"))


def _notes(span: dict[str, Any]) -> str:
    attrs = span.get("attributes") or {}
    parts = [f"{k}={attrs[k]}" for k in SHOWN_ATTRIBUTES if k in attrs]
    if (span.get("status") or {}).get("code") == "ERROR":
        desc = (span.get("status") or {}).get("description")
        parts.append(f"ERROR{': ' + desc if desc else ''}")
    return "  " + " ".join(parts) if parts else ""


def _bar_chars(stream: Any) -> tuple[str, str]:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "█·".encode(encoding)
        return "█", "·"
    except (UnicodeEncodeError, LookupError):
        return "#", "."


def format_waterfall(request: Request, width: int = 40, chars: tuple[str, str] = ("█", "·")) -> str:
    """The text waterfall of one request (several lines, no trailing newline)."""
    full, empty = chars
    t0 = request.start_ns
    total = max(request.end_ns - t0, 1)
    scale = width / total
    name_w = min(max(len(_label(r)) for r in request.rows), 56)
    root = request.root
    attrs = root.get("attributes") or {}
    status = attrs.get("http.response.status_code", (root.get("status") or {}).get("code"))
    axis = f"timeline {total / 1e6:.3f} ms"
    lines = [
        f"{root.get('name', '?')}  trace {request.trace_id}  {request.duration_ns / 1e6:.3f} ms"
        f"  status {status}  ({len(request.rows)} spans)",
        f"  {'span':<{name_w}}  {'start ms':>9}  {'dur ms':>9}  |{axis:<{width}}|",
    ]
    for row in request.rows:
        s = row.span
        start = s["start_ns"] - t0
        dur = _duration(s)
        a = min(int(start * scale), width - 1)
        b = max(min(int(round((start + dur) * scale)), width), a + 1)  # at least one cell: visible
        bar = empty * a + full * (b - a) + empty * (width - b)
        label = _label(row)
        if len(label) > name_w:
            label = label[: name_w - 1] + "…"
        lines.append(f"  {label:<{name_w}}  {start / 1e6:9.3f}  {dur / 1e6:9.3f}  |{bar}|{_notes(s)}")
    return "\n".join(lines)


def _failed(span: dict[str, Any]) -> bool:
    return (span.get("status") or {}).get("code") == "ERROR"


def plot_png(requests: list[Request], path: str | Path) -> Path:
    """Draw the waterfalls of ``requests`` (one panel each) into a PNG with matplotlib's Agg backend:
    span names indented by depth as in the terminal view, bars coloured by depth, failed spans red
    and hatched with their error, spans linked from another trace grey, and a legend saying so."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    heights = [max(len(r.rows), 1) * 0.3 + 0.3 for r in requests]  # inches of bars per panel
    gap = 0.75  # inches between panels: the x axis' label and the next panel's title
    total = sum(heights) + gap * len(requests) + 0.3  # and the legend on top
    fig, axes = plt.subplots(len(requests), 2, figsize=(13, total), squeeze=False, gridspec_kw={
        "height_ratios": heights, "width_ratios": [1, 4], "wspace": 0.01,
        "hspace": gap / (sum(heights) / len(requests))})
    fig.subplots_adjust(left=0.01, right=0.98, top=1 - 0.6 / total, bottom=0.5 / total)
    colors = plt.get_cmap("tab10").colors
    depths = set()
    for (names, ax), req in zip(axes, requests, strict=True):
        t0 = req.start_ns
        total_ms = max(req.end_ns - t0, 1) / 1e6
        ys = list(range(len(req.rows)))
        for y, row in zip(ys, req.rows, strict=True):
            s = row.span
            start, dur = (s["start_ns"] - t0) / 1e6, _duration(s) / 1e6
            shown = max(dur, total_ms * 0.002)  # a sliver stays visible
            failed = _failed(s)
            depths.add(row.depth)
            color = "tab:red" if failed else "tab:gray" if row.linked else colors[row.depth % len(colors)]
            ax.barh(y, shown, left=start, color=color, height=0.7, alpha=0.9, hatch="//" if failed else None,
                    edgecolor="black" if failed else color)
            note = f"{dur:.3f} ms" + ("  ERROR" + (f": {s['status']['description']}" if s["status"].get(
                "description") else "") if failed else "")
            ax.text(start + shown + total_ms * 0.005, y, note, va="center", fontsize=7,
                    color="tab:red" if failed else "black")
            # The name column: indented by depth, with the tree's connector, as in the terminal view.
            label = ("└ " if row.depth else "") + ("~ " if row.linked else "") + str(s.get("name", "?"))
            names.text(0.02 + 0.05 * row.depth, y, label, va="center", ha="left", fontsize=8, family="monospace",
                       color="tab:red" if failed else "black", fontweight="bold" if row.depth == 0 else "normal")
        for a in (names, ax):
            a.set_ylim(len(ys) - 0.5, -0.5)  # the first span on top, both columns row by row
            a.set_yticks([])
        names.set_xlim(0, 1)
        names.axis("off")
        ax.set_xlim(0, total_ms * 1.2)
        ax.set_xlabel("ms since request start", fontsize=8)
        title = f"{req.root.get('name', '?')}  trace {req.trace_id[:16]}…  {req.duration_ns / 1e6:.3f} ms"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=colors[d % len(colors)], label="the request (depth 0)" if d == 0 else f"depth {d}")
              for d in sorted(depths)]
    legend += [Patch(facecolor="tab:red", edgecolor="black", hatch="//", label="ERROR status"),
               Patch(color="tab:gray", label="~ linked from another trace")]
    fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hydraserve traces",
        description="Waterfalls of the slowest requests from a traces.jsonl written by tracing=file.",
    )
    p.add_argument("file", metavar="FILE", help="traces.jsonl, or a folder: its newest traces.jsonl is used")
    p.add_argument("--top", type=int, default=5, help="how many of the slowest requests to show (default 5)")
    p.add_argument("--trace-id", default=None, help="show this trace only (a unique prefix is enough)")
    p.add_argument("--png", default=None, metavar="PATH", help="also draw the waterfalls into this PNG")
    p.add_argument("--width", type=int, default=40, help="characters of the timeline bar (default 40)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        source = resolve_file(args.file)
        spans = load_spans(source)
    except OSError as exc:
        print(f"hydraserve traces: {exc}", file=sys.stderr)
        return 2
    if not spans:
        print(f"hydraserve traces: {source} holds no spans (is the server running with tracing=file? "
              "Spans are written every tracing.flush_interval_ms)", file=sys.stderr)
        return 1
    index = Index(spans)
    trace_id = None
    if args.trace_id:
        wanted = args.trace_id.lower().removeprefix("00-")[:32]  # a whole traceparent works too
        matches = [t for t in index.by_trace if t.startswith(wanted)]
        if len(matches) != 1:
            what = "no trace" if not matches else f"{len(matches)} traces"
            print(f"hydraserve traces: {what} in {source} match --trace-id {args.trace_id}", file=sys.stderr)
            return 1
        trace_id = matches[0]
    requests = index.requests(trace_id)
    chosen = requests if trace_id else slowest(requests, args.top)
    chosen = sorted(chosen, key=lambda r: r.duration_ns, reverse=True)
    print(f"{source}: {len(spans)} spans, {len(index.by_trace)} traces, {len(requests)} requests", file=out)
    if trace_id is None:
        print(f"slowest {len(chosen)} of {len(requests)} requests:", file=out)
    chars = _bar_chars(out)
    png = Path(args.png) if args.png and chosen else None
    if png is not None and importlib.util.find_spec("matplotlib") is None:
        # The picture needs the bench extra; the terminal view below does not.
        print("--png needs matplotlib: install it with: pip install 'hydraserve[bench]'", file=sys.stderr)
        return 2
    try:
        for req in chosen:
            print("", file=out)
            print(format_waterfall(req, width=max(args.width, 10), chars=chars), file=out)
        if png is not None:
            plot_png(chosen, png)
            png = None
            print(f"\nwrote {args.png}", file=out)
        out.flush()
    except BrokenPipeError:  # `hydraserve traces ... | head`: the reader has seen enough
        # Point stdout at /dev/null so the flush at exit raises no second error (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        if png is not None:
            plot_png(chosen, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
