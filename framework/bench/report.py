"""One run's reports: ``results.json`` (everything), ``summary.md`` (for people), ``latency.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA = "hydraserve.bench/1"
PCTS = ("p50", "p90", "p95", "p99")


def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


GROUP_ORDER = ("model", "quantization", "batching", "cache", "hardware", "server", "tracing", "experiment", "bench")


def ordered_choices(choices: dict) -> dict:
    """Config groups in the order of serve.yaml's defaults list, then any others."""
    first = {k: choices[k] for k in GROUP_ORDER if k in choices}
    return first | {k: v for k, v in choices.items() if k not in first}


def ratios(stages: list[dict], baseline_stages: list[dict]) -> list[dict]:
    """hydraserve / baseline per offered rate: latency ratios (>1: slower) and goodput ratio."""
    by_rate = {s["offered_rate"]: s for s in baseline_stages}
    out = []
    for s in stages:
        b = by_rate.get(s["offered_rate"])
        if b is None:
            continue
        row = {"offered_rate": s["offered_rate"]}
        for p in ("p50", "p99"):
            ours, theirs = s["latency_ms"].get(p), b["latency_ms"].get(p)
            row[p] = round(ours / theirs, 3) if ours is not None and theirs else None
        row["goodput"] = round(s["goodput"] / b["goodput"], 3) if b.get("goodput") else None
        out.append(row)
    return out


def write_results(results: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")  # a reader (the sweep report) never sees half a file
    tmp.write_text(json.dumps({"schema": SCHEMA, **results}, indent=2, default=str))
    tmp.replace(path)
    return path


def _stage_table(stages: list[dict]) -> list[str]:
    lines = ["| offered req/s | sent | achieved req/s | throughput | goodput | p50 ms | p90 ms | p95 ms "
             "| p99 ms | max ms | send lag p99 ms | errors | cache hit |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for s in stages:
        lat = s["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        lines.append(
            f"| {s['offered_rate']:g} | {s['sent']} | {fmt(s['achieved_send_rate'], 1)} | {fmt(s['throughput'], 1)} "
            f"| {fmt(s['goodput'], 1)} | {fmt(lat['p50'])} | {fmt(lat['p90'])} | {fmt(lat['p95'])} "
            f"| {fmt(lat['p99'])} | {fmt(lat['max'])} | {fmt(s['send_lag_ms']['p99'])} | {errors} "
            f"| {fmt(s['cache_hit_ratio'], 3)} |")
    return lines


def is_chat(results: dict) -> bool:
    return any("chat" in st for st in results.get("stages") or [])


def _chat_table(stages: list[dict]) -> list[str]:
    lines = ["| offered req/s | sent | ok | req/s | output tok/s | goodput req/s | SLO met | TTFT p50 ms "
             "| TTFT p99 ms | ITL p50 ms | ITL p99 ms | TPOT p50 ms | e2e p50 ms | e2e p99 ms | tokens/req "
             "| errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in stages:
        c = s["chat"]
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        met = s.get("slo_attainment")
        met_pct = None if met is None else met * 100
        lines.append(
            f"| {s['offered_rate']:g} | {s['sent']} | {s['ok']} | {fmt(c['requests_per_s'])} "
            f"| {fmt(c['output_tokens_per_s'], 1)} | {fmt(c['goodput'])} | {fmt(met_pct, 1, '%')} "
            f"| {fmt(c['ttft_ms']['p50'])} | {fmt(c['ttft_ms']['p99'])} | {fmt(c['itl_ms']['p50'])} "
            f"| {fmt(c['itl_ms']['p99'])} | {fmt(c['tpot_ms']['p50'])} | {fmt(c['e2e_ms']['p50'])} "
            f"| {fmt(c['e2e_ms']['p99'])} | {fmt(c['output_tokens_per_request'], 1)} | {errors} |")
    return lines


def _chat_summary(r: dict, choices: dict) -> list[str]:
    stages = r.get("stages", [])
    slo = (r.get("bench") or {}).get("slo") or {}
    metric = slo.get("itl_metric", "tpot")
    pace = "TPOT (mean time per output token after the first)" if metric == "tpot" else "largest gap between chunks"
    lines = [
        "config: " + (" ".join(f"{k}={v}" for k, v in choices.items()) or "(defaults)"),
        "",
        "overrides: `" + (" ".join(r.get("config", {}).get("overrides", [])) or "(none)") + "`",
        "",
        f"target: {r.get('target', {}).get('url', '—')} {r.get('bench', {}).get('path', '')} (streamed chat)  ",
        f"first answer after /health: {fmt((r.get('first_answer') or {}).get('seconds'), 2, ' s')}  ",
        f"SLO: TTFT <= {fmt(slo.get('ttft_ms'), 0)} ms and {pace} <= {fmt(slo.get('itl_ms'), 0)} ms; goodput = "
        "requests per second that succeeded within both  ",
        f"workload: {json.dumps(r.get('workload', {}))}",
        "",
        "## hydraserve (streamed chat)",
        "",
        *_chat_table(stages),
        "",
    ]
    msgs = {k: v for s in stages for k, v in (s["chat"].get("error_messages") or {}).items()}
    if msgs:
        lines += ["Errors (first message of each kind):", ""]
        lines += [f"- `{k}`: {str(v).splitlines()[0][:200]}" for k, v in msgs.items()] + [""]
    lines += ["TTFT: intended send time to the first chunk with content. ITL: every gap between content chunks "
              "(a chunk may carry several tokens). TPOT = (e2e - TTFT) / (output tokens - 1), output tokens "
              "from the final usage chunk. e2e: intended send time to `data: [DONE]`. All from the open-loop "
              "schedule, so client-side queueing counts. Per-request rows: requests.jsonl.", ""]
    return lines


def quality_text(quality: dict | None, quantization: str | None = None) -> str:
    if quality:
        return (f"{quality.get('metric', 'cosine')} min {fmt(quality.get('min'), 4)}, "
                f"mean {fmt(quality.get('mean'), 4)} against the unquantized model")
    if quantization in (None, "none"):
        return "reference (no quantization)"
    return "not reported by the server"


def write_summary(results: dict, out_dir: str | Path) -> Path:
    r = results
    choices = ordered_choices(r.get("config", {}).get("choices", {}))
    lines = ["# hydraserve bench", ""]
    if r.get("status") != "ok":
        lines += [f"**Status: {r.get('status')}**" + (f": {r['error']}" if r.get("error") else ""), ""]
    if is_chat(r):
        path = Path(out_dir) / "summary.md"
        path.write_text("\n".join(lines + _chat_summary(r, choices)))
        return path
    lines += [
        "config: " + (" ".join(f"{k}={v}" for k, v in choices.items()) or "(defaults)"),
        "",
        "overrides: `" + (" ".join(r.get("config", {}).get("overrides", [])) or "(none)") + "`",
        "",
        f"target: {r.get('target', {}).get('url', '—')}  ",
        f"first answer after /health: {fmt((r.get('first_answer') or {}).get('seconds'), 2, ' s')} (the server may "
        "still compile or load on its first requests; the warm-up and measurement start after it)  ",
        f"quality: {quality_text(r.get('quality'), choices.get('quantization'))}  ",
        f"SLO: {r.get('bench', {}).get('slo_ms')} ms from the intended send time (goodput = 2xx answers "
        "within it, per second)  ",
        f"workload: {json.dumps(r.get('workload', {}))}",
        "",
        "## hydraserve",
        "",
        *_stage_table(r.get("stages", [])),
        "",
    ]
    for name, base in (r.get("baselines") or {}).items():
        lines += [f"## baseline: {name}", ""]
        if base.get("error"):
            lines += [f"failed: {base['error'].splitlines()[0]} (log: baseline_{name}.log in this folder)", ""]
            continue
        lines += [*_stage_table(base.get("stages", [])), ""]
        rows = r.get("ratios", {}).get(name) or []
        if rows:
            lines += [f"hydraserve / {name} (latency: < 1 is faster; goodput: > 1 is better)", "",
                      "| offered req/s | p50 ratio | p99 ratio | goodput ratio |", "|---:|---:|---:|---:|"]
            lines += [f"| {x['offered_rate']:g} | {fmt(x['p50'], 2, 'x')} | {fmt(x['p99'], 2, 'x')} "
                      f"| {fmt(x['goodput'], 2, 'x')} |" for x in rows]
            lines.append("")
    lines += ["Latency is measured from each request's intended send time (open loop), so client-side "
              "and server-side queueing both count. `send lag` is how late requests left the client: "
              "when it is large the client or its connection pool was the limit, not the server.", ""]
    path = Path(out_dir) / "summary.md"
    path.write_text("\n".join(lines))
    return path


# Per series: hydraserve first, then each baseline; a colour and a marker each, the same in both panels.
SERIES_STYLE = (("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "^"), ("tab:purple", "D"),
                ("tab:brown", "v"), ("tab:pink", "P"))


def _series(results: dict) -> tuple[list[tuple[str, list[dict]]], list[str]]:
    """(name, stages that answered) for hydraserve and every baseline with data; failed baselines' names."""
    series = [("hydraserve", [s for s in results.get("stages") or [] if s.get("ok")])]
    failed = []
    for name, base in (results.get("baselines") or {}).items():
        st = [s for s in (base or {}).get("stages") or [] if s.get("ok")]
        if st:
            series.append((name, st))
        else:
            failed.append(name)
    return series, failed


def plot_latency(results: dict, out_dir: str | Path) -> Path | None:
    """Latency (p50 point, p90 tick, whisker to p99) and goodput/throughput per offered rate, one colour
    and marker per server (hydraserve solid, baselines dashed). Rates sit side by side as categories, so
    a run with a single rate reads as well as a sweep."""
    stages = results.get("stages") or []
    if not any(s.get("ok") for s in stages):
        return None
    if is_chat(results):
        return plot_chat(results, out_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    series, failed = _series(results)
    rates = sorted({s["offered_rate"] for _, st in series for s in st})
    pos = {r: i for i, r in enumerate(rates)}
    n = len(series)
    width = 0.8 / n  # each server's slot inside a rate's group
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 5.8))
    for k, (_name, st) in enumerate(series):
        colour, marker = SERIES_STYLE[k % len(SERIES_STYLE)]
        style = "-" if k == 0 else "--"
        shift = (k - (n - 1) / 2) * width
        lat = [s for s in st if s["latency_ms"].get("p50") is not None]
        xs = [pos[s["offered_rate"]] + shift for s in lat]
        p50 = [s["latency_ms"]["p50"] for s in lat]
        p90 = [s["latency_ms"].get("p90") or s["latency_ms"]["p50"] for s in lat]
        p99 = [s["latency_ms"].get("p99") or s["latency_ms"]["p50"] for s in lat]
        ax_lat.errorbar(xs, p50, yerr=[[0] * len(p50), [hi - lo for lo, hi in zip(p50, p99, strict=True)]],
                        fmt=marker, color=colour, markersize=7, capsize=4, elinewidth=1.2, zorder=3)
        ax_lat.plot(xs, p90, "_", color=colour, markersize=12, markeredgewidth=2, zorder=3)
        if len(xs) > 1:
            ax_lat.plot(xs, p50, style, color=colour, linewidth=1.2, alpha=0.8)
        for x, top in zip(xs, p99, strict=True):
            ax_lat.annotate(f"{top:.3g}", (x, top), textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=6, color=colour)
        good = [s.get("goodput") or 0 for s in st]
        thr = [s.get("throughput") or 0 for s in st]
        bx = [pos[s["offered_rate"]] + shift for s in st]
        ax_thr.bar(bx, thr, width=width * 0.9, color=colour, alpha=0.25, edgecolor=colour,
                   linestyle=style, linewidth=1)
        bars = ax_thr.bar(bx, good, width=width * 0.9, color=colour, edgecolor=colour,
                          hatch=None if k == 0 else "//", alpha=0.9)
        ax_thr.bar_label(bars, labels=[f"{g:.3g}" for g in good], fontsize=7, padding=2)
    for r, i in pos.items():  # what was offered: a grey bar across the group
        ax_thr.hlines(r, i - 0.45, i + 0.45, color="grey", linestyle=":", linewidth=1.5)
    slo = results.get("bench", {}).get("slo_ms")
    handles = [Line2D([], [], color=SERIES_STYLE[k % len(SERIES_STYLE)][0],
                      marker=SERIES_STYLE[k % len(SERIES_STYLE)][1], linestyle="-" if k == 0 else "--",
                      label=name) for k, (name, _) in enumerate(series)]
    handles += [Line2D([], [], color="none", label=f"{name}: failed (see summary.md)") for name in failed]
    key = [Line2D([], [], color="dimgrey", marker="o", linestyle="none", label="point: p50"),
           Line2D([], [], color="dimgrey", marker="_", markersize=12, markeredgewidth=2, linestyle="none",
                  label="tick: p90"),
           Line2D([], [], color="dimgrey", marker="|", markersize=12, linestyle="none",
                  label="whisker top: p99 (number)")]
    if slo:
        ax_lat.axhline(slo, color="red", linewidth=1, linestyle=":")
        key.append(Line2D([], [], color="red", linestyle=":", label=f"SLO {slo:g} ms"))
    ax_lat.set(ylabel="latency from intended send (ms, log)", yscale="log",
               title="latency per offered rate: p50, p90, p99")
    thr_key = [Patch(facecolor="dimgrey", label="solid: goodput (2xx within SLO, req/s)"),
               Patch(facecolor="dimgrey", alpha=0.25, label="light: throughput (2xx req/s)"),
               Line2D([], [], color="grey", linestyle=":", linewidth=1.5, label="offered rate")]
    ax_thr.set(ylabel="requests per second", title="goodput and throughput per offered rate")
    ax_thr.set_ylim(0, max([*rates, *(s.get("throughput") or 0 for _, st in series for s in st)]) * 1.18)
    for ax in (ax_lat, ax_thr):
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlim(-0.6, len(rates) - 0.4)
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(True, axis="y", alpha=0.3)
    # Legends below the panels, never over the data: the servers once for both, then each panel's key.
    for ax, extra in ((ax_lat, key), (ax_thr, thr_key)):
        ax.legend(handles=extra, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                  frameon=False)
    fig.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.95),
               ncol=min(len(handles), 6), frameon=False)
    choices = ordered_choices(results.get("config", {}).get("choices", {}))
    fig.suptitle(" ".join(f"{k}={v}" for k, v in choices.items()) or "hydraserve bench", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    path = Path(out_dir) / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_chat(results: dict, out_dir: str | Path) -> Path:
    """Streamed chat: TTFT and ITL CDFs (one line per offered rate) and tokens/s, goodput per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in results.get("stages") or [] if s.get("ok")]
    slo = (results.get("bench") or {}).get("slo") or {}
    fig, (ax_ttft, ax_itl, ax_thr) = plt.subplots(1, 3, figsize=(15, 4.5))
    for k, s in enumerate(stages):
        cdf = s["chat"]["cdf"]
        pcts = cdf["percentiles"]
        colour, marker = SERIES_STYLE[k % len(SERIES_STYLE)]
        for ax, key in ((ax_ttft, "ttft_ms"), (ax_itl, "itl_ms")):
            if cdf.get(key):
                ax.plot(cdf[key], pcts, marker=marker, markersize=4, color=colour,
                        linestyle=("-", "--", "-.", ":")[k % 4], label=f"{s['offered_rate']:g} req/s")
    if slo.get("ttft_ms"):
        ax_ttft.axvline(slo["ttft_ms"], color="grey", linestyle=":", label=f"SLO {slo['ttft_ms']:g} ms")
    if slo.get("itl_ms"):
        ax_itl.axvline(slo["itl_ms"], color="grey", linestyle=":",
                       label=f"SLO {slo['itl_ms']:g} ms ({slo.get('itl_metric', 'tpot')})")
    ax_ttft.set(xlabel="time to first token (ms, from intended send)", ylabel="percentile", title="TTFT CDF",
                xscale="log")
    ax_itl.set(xlabel="gap between content chunks (ms)", ylabel="percentile", title="inter-token latency CDF",
               xscale="log")
    rates = [s["offered_rate"] for s in stages]
    x = range(len(rates))
    done = ax_thr.bar([i - 0.2 for i in x], [s["chat"]["requests_per_s"] or 0 for s in stages], width=0.4,
                      label="req/s")
    good = ax_thr.bar([i + 0.2 for i in x], [s["chat"]["goodput"] or 0 for s in stages], width=0.4,
                      label="goodput req/s (within both SLOs)")
    for bars in (done, good):
        ax_thr.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax_thr.set_xticks(list(x), [f"{r:g}" for r in rates])
    ax_tok = ax_thr.twinx()
    tok = [s["chat"]["output_tokens_per_s"] or 0 for s in stages]
    ax_tok.plot(list(x), tok, "k-o", label="output tok/s (right axis)")
    ax_tok.set_ylabel("output tokens/s")
    # Headroom on both axes: the legend and the numbers on the bars sit above the bars and the line.
    ax_thr.set_ylim(0, max([s["chat"]["requests_per_s"] or 0 for s in stages] + [1e-9]) * 1.45)
    ax_tok.set_ylim(0, max(tok + [1e-9]) * 1.15)
    ax_thr.set(xlabel="offered rate (req/s)", ylabel="req/s", title="throughput and goodput")
    for ax in (ax_ttft, ax_itl, ax_thr):
        ax.grid(True, alpha=0.3)
    for ax in (ax_ttft, ax_itl):
        ax.legend(fontsize=7, loc="lower right")
    bar_handles, bar_labels = ax_thr.get_legend_handles_labels()
    tok_handles, tok_labels = ax_tok.get_legend_handles_labels()
    ax_tok.legend(bar_handles + tok_handles, bar_labels + tok_labels, fontsize=7, loc="upper left")
    choices = ordered_choices(results.get("config", {}).get("choices", {}))
    fig.suptitle((" ".join(f"{k}={v}" for k, v in choices.items()) or "hydraserve bench") + " (streamed chat)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Everything for one run; a plotting failure never loses results.json or the summary."""
    written = {"results": write_results(results, out_dir), "summary": write_summary(results, out_dir)}
    try:
        png = plot_latency(results, out_dir)
    except Exception as exc:  # a broken matplotlib install must not cost the measurements
        (Path(out_dir) / "plot_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        png = None
    if png is not None:
        written["plot"] = png
    return written
