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


def plot_latency(results: dict, out_dir: str | Path) -> Path | None:
    """Latency percentiles and throughput/goodput against the offered rate (baselines dashed)."""
    stages = results.get("stages") or []
    if not any(s.get("ok") for s in stages):
        return None
    if is_chat(results):
        return plot_chat(results, out_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("hydraserve", stages, "-")] + [
        (name, b.get("stages") or [], "--") for name, b in (results.get("baselines") or {}).items()]
    colours = {"p50": "tab:blue", "p90": "tab:green", "p95": "tab:orange", "p99": "tab:red"}
    for name, st, style in series:
        st = [s for s in st if s.get("ok")]
        if not st:
            continue
        rates = [s["offered_rate"] for s in st]
        for p in ("p50", "p90", "p99"):
            ax_lat.plot(rates, [s["latency_ms"][p] for s in st], style, marker="o", color=colours[p],
                        label=f"{name} {p}")
        ax_thr.plot(rates, [s["goodput"] for s in st], style, marker="o", label=f"{name} goodput")
        if name == "hydraserve":
            ax_thr.plot(rates, [s["throughput"] for s in st], ":", marker="x", label=f"{name} throughput")
    slo = results.get("bench", {}).get("slo_ms")
    if slo:
        ax_lat.axhline(slo, color="grey", linewidth=0.8, linestyle=":", label=f"SLO {slo:g} ms")
    top = max(s["offered_rate"] for s in stages)
    ax_thr.plot([0, top], [0, top], color="lightgrey", linewidth=0.8, label="offered")
    ax_lat.set(xlabel="offered rate (req/s)", ylabel="latency from intended send (ms)", yscale="log",
               title="latency percentiles")
    ax_thr.set(xlabel="offered rate (req/s)", ylabel="req/s", title="goodput (within SLO) and throughput")
    for ax in (ax_lat, ax_thr):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    choices = ordered_choices(results.get("config", {}).get("choices", {}))
    fig.suptitle(" ".join(f"{k}={v}" for k, v in choices.items()) or "hydraserve bench", fontsize=9)
    fig.tight_layout()
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
    for s in stages:
        cdf = s["chat"]["cdf"]
        pcts = cdf["percentiles"]
        for ax, key in ((ax_ttft, "ttft_ms"), (ax_itl, "itl_ms")):
            if cdf.get(key):
                ax.plot(cdf[key], pcts, marker=".", label=f"{s['offered_rate']:g} req/s")
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
    ax_thr.bar([i - 0.2 for i in x], [s["chat"]["requests_per_s"] for s in stages], width=0.4, label="req/s")
    ax_thr.bar([i + 0.2 for i in x], [s["chat"]["goodput"] for s in stages], width=0.4, label="goodput req/s")
    ax_thr.set_xticks(list(x), [f"{r:g}" for r in rates])
    ax_tok = ax_thr.twinx()
    ax_tok.plot(list(x), [s["chat"]["output_tokens_per_s"] for s in stages], "k-o", label="output tok/s")
    ax_tok.set_ylabel("output tokens/s")
    ax_thr.set(xlabel="offered rate (req/s)", ylabel="req/s", title="throughput and goodput")
    ax_tok.legend(fontsize=7, loc="upper right")
    for ax in (ax_ttft, ax_itl, ax_thr):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is not ax_thr else "upper left")
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
