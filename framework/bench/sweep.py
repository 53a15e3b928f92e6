"""After a multirun: one comparison of every config, ranked by goodput at the SLO, and the winner.

``SweepReport`` is a Hydra callback (declared in ``conf/bench.yaml`` under ``hydra.callbacks``);
``on_multirun_end`` reads each job's ``results.json`` under the sweep folder and writes there:

* ``comparison.md`` and ``comparison.csv``: one row per config, best first, quality beside each;
* ``comparison.png``: p99 latency against offered rate per config, and goodput per config (numbers on
  the bars, the recommended config starred);
* with ``bench.recommend=true``: two ``conf/experiment`` presets (``# @package _global_`` +
  ``override /group: option`` + parameter overrides): ``recommended_experiment.yaml``, the config with
  the highest goodput (throughput), and ``recommended_low_latency.yaml``, the config whose p50 answer
  time at the lowest offered rate is shortest (what one person waiting sees on a nearly idle server).

The same report can be rebuilt from a sweep folder at any time::

    python -m framework.bench.sweep multirun/bench/2025-01-01/12-00-00 --recommend
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.bench.report import fmt, quality_text
from framework.bench.stats import best_stage

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    Callback = object  # type: ignore[assignment,misc]

log = logging.getLogger("hydraserve.bench")
PLUGIN_AND_FRAMEWORK_GROUPS = ("model", "quantization", "batching", "cache", "hardware", "server", "tracing")
# Set by the bench per run, never part of a recommendation.
_IGNORED_PARAMS = {("server", "port"), ("server", "host"), ("cache", "directory")}
RECOMMENDED_NAME = "recommended_experiment.yaml"
RECOMMENDED_LATENCY_NAME = "recommended_low_latency.yaml"
CSV_FIELDS = ["rank", "config", "status", "goodput_rps", "at_offered_rps", "slo_ms", "throughput_rps",
              "p50_ms", "p95_ms", "p99_ms", "error_rate", "cache_hit_ratio", "quality_metric", "quality_min",
              "quality_mean", "vs_fastapi_echo_p50", "vs_litserve_raw_goodput", "ttft_p50_ms", "tpot_p50_ms",
              "output_tokens_per_s", "low_rate_p50_ms", "low_rate_ttft_p50_ms", "low_rate_tpot_p50_ms", "run_dir",
              "error"]


# ------------------------------------------------------------------------------------------ loading
def load_runs(sweep_dir: str | Path, max_runs: int = 10_000) -> list[dict]:
    """Every job's results.json under ``sweep_dir`` (the job folder is recorded as ``run_dir``)."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("results.json"))[:max_runs]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if isinstance(data, dict) and "stages" in data:
            data["run_dir"] = str(path.parent)
            runs.append(data)
    return runs


def _varying_overrides(runs: list[dict]) -> set[str]:
    """Override keys whose value differs between runs: what names a config in the table."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for item in run.get("config", {}).get("overrides", []):
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    keys = {k for k, v in values.items() if len(v) > 1}
    for run in runs:  # a key set in only some runs varies too
        present = {o.partition("=")[0] for o in run.get("config", {}).get("overrides", [])}
        keys |= set(values) - present
    return keys


def label(run: dict, varying: set[str]) -> str:
    overrides = run.get("config", {}).get("overrides", [])
    picked = [o for o in overrides if o.partition("=")[0] in varying] or overrides
    return " ".join(picked) or "(defaults)"


# -------------------------------------------------------------------------------------------- rows
def rows(runs: list[dict]) -> list[dict]:
    """One row per run, ranked: completed runs by goodput (then output tokens/s, then p99), failed ones last."""
    varying = _varying_overrides(runs)
    out = []
    for run in runs:
        best = run.get("best") or best_stage(run.get("stages") or [])
        quality = run.get("quality") or {}
        row: dict[str, Any] = {
            "config": label(run, varying),
            "status": run.get("status", "?") if best else ("failed" if run.get("status") == "ok" else
                                                           run.get("status", "failed")),
            "goodput_rps": best["goodput"] if best else None,
            "at_offered_rps": best["offered_rate"] if best else None,
            "slo_ms": (run.get("bench") or {}).get("slo_ms"),
            "throughput_rps": best["throughput"] if best else None,
            "p50_ms": best["latency_ms"]["p50"] if best else None,
            "p95_ms": best["latency_ms"]["p95"] if best else None,
            "p99_ms": best["latency_ms"]["p99"] if best else None,
            "error_rate": best["error_rate"] if best else None,
            "cache_hit_ratio": best.get("cache_hit_ratio") if best else None,
            "quality_metric": quality.get("metric"),
            "quality_min": quality.get("min"),
            "quality_mean": quality.get("mean"),
            "low_rate_p50_ms": _low_rate_p50(run),
            "vs_fastapi_echo_p50": _ratio_at(run, "fastapi_echo", best, "p50"),
            "vs_litserve_raw_goodput": _ratio_at(run, "litserve_raw", best, "goodput"),
            "run_dir": run.get("run_dir", ""),
            "error": (run.get("error") or "").splitlines()[0][:200] if run.get("error") else "",
            "_run": run,
        }
        row.update(_chat_columns(run, best))
        out.append(row)
    ok = [r for r in out if r["goodput_rps"] is not None]
    bad = [r for r in out if r["goodput_rps"] is None]
    # equal goodput (on a box too slow for the SLO, every chat config's is ~0): more output tokens/s first
    ok.sort(key=lambda r: (-r["goodput_rps"], -(r.get("output_tokens_per_s") or 0.0),
                           r["p99_ms"] if r["p99_ms"] is not None else float("inf")))
    for i, r in enumerate(ok + bad, 1):
        r["rank"] = i if r["goodput_rps"] is not None else "-"
    return ok + bad


def _low_rate_p50(run: dict) -> float | None:
    """p50 answer time (to the last byte) at the lowest offered rate, if that stage answered at all."""
    stages = [s for s in run.get("stages") or [] if s.get("sent") and s.get("ok")]
    if not stages:
        return None
    return min(stages, key=lambda s: s.get("offered_rate") or 0.0)["latency_ms"].get("p50")


def _chat_columns(run: dict, best: dict | None) -> dict[str, Any]:
    """A streamed-chat run's token pace: at its best stage (throughput) and at its lowest offered rate
    (what one person waiting sees when the server is nearly idle)."""
    stages = [s for s in run.get("stages") or [] if s.get("sent") and s.get("chat")]
    if not stages or not best or not best.get("chat"):
        return {}
    low = min(stages, key=lambda s: s.get("offered_rate") or 0.0)["chat"]
    top = best["chat"]
    return {"ttft_p50_ms": top["ttft_ms"]["p50"], "tpot_p50_ms": top["tpot_ms"]["p50"],
            "output_tokens_per_s": top["output_tokens_per_s"], "low_rate_ttft_p50_ms": low["ttft_ms"]["p50"],
            "low_rate_tpot_p50_ms": low["tpot_ms"]["p50"], "chat_slo": top.get("slo")}


def _ratio_at(run: dict, baseline: str, best: dict | None, key: str) -> float | None:
    if not best:
        return None
    for row in (run.get("ratios") or {}).get(baseline) or []:
        if row.get("offered_rate") == best["offered_rate"]:
            return row.get(key)
    return None


def _qualifies(r: dict, min_quality: float | None) -> bool:
    """Completed, and its quality meets ``min_quality`` (configs without a quality figure, e.g. no
    quantization, are the reference and always qualify)."""
    if r["goodput_rps"] is None or r["status"] != "ok":
        return False
    return min_quality is None or r["quality_min"] is None or r["quality_min"] >= min_quality


def pick_winner(ranked: list[dict], min_quality: float | None = None) -> dict | None:
    """Throughput: the qualifying config with the highest goodput (``ranked`` is in that order)."""
    return next((r for r in ranked if _qualifies(r, min_quality)), None)


def pick_fastest(ranked: list[dict], min_quality: float | None = None) -> dict | None:
    """Latency: the qualifying config with the shortest p50 answer time at the lowest offered rate
    (ties: the higher goodput). None when no config answered at that rate."""
    timed = [r for r in ranked if _qualifies(r, min_quality) and r.get("low_rate_p50_ms") is not None]
    return min(timed, key=lambda r: (r["low_rate_p50_ms"], -r["goodput_rps"]), default=None)


# ------------------------------------------------------------------------------------------ writing
def _quality_cell(r: dict) -> str:
    if r["quality_metric"]:
        return f"{r['quality_metric']} min {fmt(r['quality_min'], 4)} / mean {fmt(r['quality_mean'], 4)}"
    if r["goodput_rps"] is None:
        return "—"
    quant = (r["_run"].get("config", {}).get("choices") or {}).get("quantization")
    return "reference" if quant in (None, "none") else "not reported"


def write_table(ranked: list[dict], out_dir: Path, winner: dict | None = None,
                min_quality: float | None = None, fastest: dict | None = None) -> tuple[Path, Path]:
    csv_path = out_dir / "comparison.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in ranked:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    chat_slo = next((r["chat_slo"] for r in ranked if r.get("chat_slo")), None)
    if chat_slo is not None:
        return _write_chat_table(ranked, out_dir, csv_path, chat_slo, winner, min_quality, fastest)
    slo = next((r["slo_ms"] for r in ranked if r.get("slo_ms") is not None), None)
    lines = [
        "# hydraserve bench: comparison", "",
        f"Ranked by goodput: 2xx answers per second within the {fmt(slo, 0)} ms SLO, measured from each "
        "request's intended send time, at the offered rate where the config did best.", "",
        "| rank | config | goodput req/s | at offered req/s | p50 ms | p95 ms | p99 ms | errors | cache hit "
        "| quality | vs FastAPI echo p50 | vs LitServe goodput | p50 ms, lowest rate | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in ranked:
        lines.append(
            f"| {r['rank']} | `{r['config']}` | {fmt(r['goodput_rps'], 1)} | {fmt(r['at_offered_rps'], 0)} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['error_rate'], 3)} "
            f"| {fmt(r['cache_hit_ratio'], 3)} | {_quality_cell(r)} | {fmt(r['vs_fastapi_echo_p50'], 2, 'x')} "
            f"| {fmt(r['vs_litserve_raw_goodput'], 2, 'x')} | {fmt(r.get('low_rate_p50_ms'))} "
            f"| {_status_cell(r, winner, min_quality, fastest)} |")
    lines += _recommended_lines(winner, fastest, min_quality, "req/s within the SLO", 1)
    lines += ["", "Per-run details (all rates, baselines, plots): each run's `summary.md` in its folder.", ""]
    md_path = out_dir / "comparison.md"
    md_path.write_text("\n".join(lines))
    return md_path, csv_path


def _status_cell(r: dict, winner: dict | None, min_quality: float | None, fastest: dict | None = None) -> str:
    status = r["status"] + (f": {r['error']}" if r["error"] else "")
    if min_quality is not None and r["quality_min"] is not None and r["quality_min"] < min_quality:
        status += f" (quality below bench.min_quality={min_quality})"
    picked = [name for name, pick in (("throughput", winner), ("latency", fastest)) if pick is r]
    if picked:
        status += f" **recommended: {', '.join(picked)}**"
    return status.replace("|", "/")


def _recommended_lines(winner: dict | None, fastest: dict | None, min_quality: float | None, unit: str,
                       digits: int) -> list[str]:
    floor = f" among configs with quality >= {min_quality}" if min_quality is not None else ""
    lines = []
    if winner is not None:
        lines += ["", f"Recommended for throughput (highest goodput{floor}): `{winner['config']}` "
                  f"({fmt(winner['goodput_rps'], digits)} {unit}), written as `{RECOMMENDED_NAME}` "
                  "with bench.recommend=true."]
    if fastest is not None:
        lines += ["", f"Recommended for latency (shortest p50 answer time at the lowest offered rate{floor}): "
                  f"`{fastest['config']}` ({fmt(fastest['low_rate_p50_ms'])} ms), written as "
                  f"`{RECOMMENDED_LATENCY_NAME}` with bench.recommend=true."]
    return lines


def _write_chat_table(ranked: list[dict], out_dir: Path, csv_path: Path, slo: dict, winner: dict | None,
                      min_quality: float | None, fastest: dict | None = None) -> tuple[Path, Path]:
    """Streamed chat runs: goodput under bench.slo (TTFT and the token pace), and the token pace itself."""
    pace = "TPOT" if slo.get("itl_metric", "tpot") == "tpot" else "largest inter-chunk gap"
    lines = [
        "# hydraserve bench: comparison (streamed chat)", "",
        f"Ranked by goodput: streamed answers per second that met bench.slo (TTFT <= {fmt(slo.get('ttft_ms'), 0)} ms "
        f"and {pace} <= {fmt(slo.get('itl_ms'), 0)} ms), at the offered rate where the config did best. TTFT, TPOT "
        "and output tokens/s are at that rate; the last three columns at the lowest offered rate (a nearly idle "
        "server: what one person waiting sees; the answer time is to the last token).", "",
        "| rank | config | goodput req/s | at offered req/s | TTFT p50 ms | TPOT p50 ms | output tok/s | errors "
        "| quality | TTFT p50 ms, lowest rate | TPOT p50 ms, lowest rate | answer p50 ms, lowest rate | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in ranked:
        lines.append(
            f"| {r['rank']} | `{r['config']}` | {fmt(r['goodput_rps'], 2)} | {fmt(r['at_offered_rps'], 1)} "
            f"| {fmt(r.get('ttft_p50_ms'))} | {fmt(r.get('tpot_p50_ms'))} | {fmt(r.get('output_tokens_per_s'), 1)} "
            f"| {fmt(r['error_rate'], 3)} | {_quality_cell(r)} | {fmt(r.get('low_rate_ttft_p50_ms'))} "
            f"| {fmt(r.get('low_rate_tpot_p50_ms'))} | {fmt(r.get('low_rate_p50_ms'))} "
            f"| {_status_cell(r, winner, min_quality, fastest)} |")
    lines += _recommended_lines(winner, fastest, min_quality, "answers/s within the SLO", 2)
    lines += ["", "Per-run details (all rates, CDFs, plots): each run's `summary.md` in its folder.", ""]
    md_path = out_dir / "comparison.md"
    md_path.write_text("\n".join(lines))
    return md_path, csv_path


CONFIG_STYLES = (("tab:blue", "o", "-"), ("tab:orange", "s", "--"), ("tab:green", "^", "-."),
                 ("tab:purple", "D", ":"), ("tab:brown", "v", "-"), ("tab:pink", "P", "--"),
                 ("tab:olive", "X", "-."), ("tab:cyan", "*", ":"), ("tab:gray", "<", "-"), ("tab:red", ">", "--"))


def plot(ranked: list[dict], out_dir: Path, winner: dict | None = None,
         min_quality: float | None = None) -> Path | None:
    """p99 per config against the offered rate, and goodput per config (numbers on the bars, the
    recommended one marked with a star and an arrow). Each config keeps its colour and marker in both."""
    done = [r for r in ranked if r["goodput_rps"] is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax_lat, ax_good) = plt.subplots(1, 2, figsize=(15, max(5.5, 2.0 + 0.6 * len(done))),
                                          gridspec_kw={"width_ratios": [1, 1.2]})
    # Left: per offered rate (side by side, so one rate reads as well as many) each config's p50 as its
    # marker and a whisker up to p99, the p99 written above it.
    rates = sorted({s["offered_rate"] for r in done for s in r["_run"].get("stages", []) if s.get("ok")})
    pos = {rate: i for i, rate in enumerate(rates)}
    width = 0.8 / len(done)
    for i, r in enumerate(done):
        colour, marker, style = CONFIG_STYLES[i % len(CONFIG_STYLES)]
        st = [s for s in r["_run"].get("stages", []) if s.get("ok") and s["latency_ms"].get("p99") is not None]
        xs = [pos[s["offered_rate"]] + (i - (len(done) - 1) / 2) * width for s in st]
        p99 = [s["latency_ms"]["p99"] for s in st]
        p50 = [s["latency_ms"].get("p50") or hi for s, hi in zip(st, p99, strict=True)]
        star = " ★ recommended" if r is winner else ""
        ax_lat.errorbar(xs, p50, yerr=[[0] * len(xs), [hi - lo for lo, hi in zip(p50, p99, strict=True)]],
                        fmt=marker, color=colour, markersize=9 if r is winner else 7, capsize=4,
                        elinewidth=2.2 if r is winner else 1.2, label=f"#{r['rank']} {r['config'][:70]}{star}")
        if len(xs) > 1:
            ax_lat.plot(xs, p50, linestyle=style, color=colour, linewidth=2.2 if r is winner else 1.2)
        for x, hi in zip(xs, p99, strict=True):
            ax_lat.annotate(f"{hi:.3g}", (x, hi), textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=7, color=colour)
    slo = done[0].get("slo_ms")
    if slo:
        ax_lat.axhline(slo, color="red", linestyle=":", linewidth=1, label=f"SLO {slo:g} ms")
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
    ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    ax_lat.set_xticks(range(len(rates)), [f"{rate:g}" for rate in rates])
    ax_lat.set_xlim(-0.6, len(rates) - 0.4)
    ax_lat.set(xlabel="offered rate (req/s)", ylabel="latency from intended send (ms, log)",
               title="latency per config: p50 (marker) to p99 (whisker, value above)")
    ax_lat.grid(True, axis="y", alpha=0.3)
    ax_lat.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    names = ["\n".join(textwrap.wrap(f"#{r['rank']} {r['config']}", 40)[:3]) for r in done]
    colours = [CONFIG_STYLES[i % len(CONFIG_STYLES)][0] for i in range(len(done))]
    below = [min_quality is not None and r["quality_min"] is not None and r["quality_min"] < min_quality
             for r in done]
    bars = ax_good.barh(range(len(done)), [r["goodput_rps"] for r in done], color=colours, alpha=0.85,
                        edgecolor="black", linewidth=0.5)
    for bar, low in zip(bars, below, strict=True):
        if low:
            bar.set_hatch("xx")
    top = max(r["goodput_rps"] for r in done) or 1.0
    for bar, r, low in zip(bars, done, below, strict=True):
        q = r["quality_min"]
        quality = "quality: reference" if q is None else f"{r['quality_metric'] or 'quality'} min {q:.4f}"
        text = f" {r['goodput_rps']:.1f} req/s at {fmt(r['at_offered_rps'], 0)} offered · {quality}"
        if low:
            text += f" (below {min_quality})"
        y = bar.get_y() + bar.get_height() / 2
        if r is winner:  # a star at the end of the bar and the word, not a colour
            ax_good.plot(bar.get_width(), y, marker="*", markersize=18, color="gold", markeredgecolor="black",
                         zorder=4, clip_on=False)
            ax_good.annotate("RECOMMENDED", xy=(bar.get_width(), y), xytext=(12, 0), textcoords="offset points",
                             va="bottom", fontsize=8, fontweight="bold")
            ax_good.annotate(text, xy=(bar.get_width(), y), xytext=(12, 0), textcoords="offset points",
                             va="top", fontsize=7)
        else:
            ax_good.text(bar.get_width(), y, text, va="center", fontsize=7)
    ax_good.set_yticks(range(len(done)), names, fontsize=7)
    for tick, r in zip(ax_good.get_yticklabels(), done, strict=True):
        if r is winner:
            tick.set_fontweight("bold")
    ax_good.invert_yaxis()  # best on top
    ax_good.set_xlim(0, top * 2.1)  # room for the numbers written after the bars
    floor = f"\nhatched: quality below bench.min_quality={min_quality}" if min_quality is not None else ""
    ax_good.set(xlabel="goodput (req/s answered within the SLO)",
                title=f"goodput per config, best first (★ recommended){floor}")
    ax_good.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- recommendation
def _primary_defaults(conf: Path) -> dict[str, str]:
    """group -> option from ``conf/serve.yaml``'s defaults list (what a preset need not repeat)."""
    out: dict[str, str] = {}
    try:
        data = OmegaConf.to_container(OmegaConf.load(conf / "serve.yaml"))
    except Exception:
        return out
    for entry in (data or {}).get("defaults", []):  # type: ignore[union-attr]
        if isinstance(entry, dict):
            for key, value in entry.items():
                if value is not None and not str(key).startswith("optional "):
                    out[str(key)] = str(value)
    return out


def _option_params(conf: Path, group: str, option: str) -> dict | None:
    path = conf / group / f"{option}.yaml"
    if not path.is_file():
        return None
    try:
        node = OmegaConf.load(path)
        data = OmegaConf.to_container(node, resolve=True)
    except Exception:
        return None
    data = dict(data or {})  # type: ignore[arg-type]
    data.pop("defaults", None)
    return data


def _diff(actual: Any, base: Any, prefix: tuple[str, ...], out: dict) -> None:
    if isinstance(actual, dict) and isinstance(base, dict):
        for key, value in actual.items():
            _diff(value, base.get(key, _MISSING), (*prefix, key), out)
    elif actual != base:
        node = out
        for key in prefix[:-1]:
            node = node.setdefault(key, {})
        node[prefix[-1]] = actual


_MISSING = object()


def recommendation(run: dict, conf: Path | None = None, row: dict | None = None,
                   objective: str = "throughput") -> str:
    """The winner as a ``conf/experiment`` preset: group choices that differ from serve.yaml's
    defaults, plus every parameter that differs from the chosen option's YAML file. ``objective``
    (throughput or latency) only words the header: what the numbers in it are."""
    if conf is None:
        from framework.config import conf_dir

        conf = conf_dir()
    cfg = run.get("config", {})
    choices = cfg.get("choices") or {}
    groups = cfg.get("groups") or {}
    defaults = _primary_defaults(conf)
    lines_defaults, params = [], {}
    for group in PLUGIN_AND_FRAMEWORK_GROUPS:
        option = choices.get(group)
        if option is None:
            continue
        if option != defaults.get(group):
            lines_defaults.append(f"  - override /{group}: {option}")
        base = _option_params(conf, group, option)
        actual = groups.get(group)
        if isinstance(actual, dict):
            if base is None:  # an installed plugin's option: keep what the run overrode by hand
                base = {k: v for k, v in actual.items() if f"{group}.{k}" not in _override_keys(cfg)}
            diff: dict = {}
            _diff({k: v for k, v in actual.items() if (group, k) not in _IGNORED_PARAMS}, base, (), diff)
            if diff:
                params[group] = diff
    head = ["# @package _global_", _recommendation_header(run, row or {}, objective, choices)]
    head.append("# Copy to conf/experiment/<name>.yaml and run `hydraserve serve experiment=<name>`.")
    body = head + ["defaults:"] + (lines_defaults or ["  - _self_"])
    text = "\n".join(body) + "\n"
    if params:
        text += "\n" + OmegaConf.to_yaml(OmegaConf.create(params))
    return text


def _recommendation_header(run: dict, best: dict, objective: str, choices: dict) -> str:
    quality = quality_text(run.get("quality"), choices.get("quantization"))
    source = f"# Recommended for {objective} by `hydraserve bench` from {run.get('run_dir', 'a sweep')}: "
    if best.get("chat_slo"):
        numbers = (f"goodput {fmt(best.get('goodput_rps'), 2)} answers/s within bench.slo at "
                   f"{fmt(best.get('at_offered_rps'), 1)} req/s offered ({fmt(best.get('output_tokens_per_s'), 1)} "
                   f"output tokens/s); at the lowest rate TTFT p50 {fmt(best.get('low_rate_ttft_p50_ms'))} ms, "
                   f"TPOT p50 {fmt(best.get('low_rate_tpot_p50_ms'))} ms")
    else:
        numbers = (f"goodput {fmt(best.get('goodput_rps'), 1)} req/s within the {fmt(best.get('slo_ms'), 0)} ms "
                   f"SLO at {fmt(best.get('at_offered_rps'), 0)} req/s offered, p99 {fmt(best.get('p99_ms'))} ms; "
                   f"p50 {fmt(best.get('low_rate_p50_ms'))} ms at the lowest rate")
    return source + numbers + f", quality {quality}."


def _override_keys(cfg: dict) -> set[str]:
    return {o.lstrip("+~").partition("=")[0] for o in cfg.get("overrides", [])}


# ------------------------------------------------------------------------------------------- entry
def aggregate(sweep_dir: str | Path, recommend: bool = False, min_quality: float | None = None) -> dict:
    """Write the comparison (and the recommendation) for the runs under ``sweep_dir``."""
    out_dir = Path(sweep_dir)
    runs = load_runs(out_dir)
    written: dict[str, Any] = {"runs": len(runs)}
    if not runs:
        log.warning("no results.json under %s: nothing to compare", out_dir)
        return written
    ranked = rows(runs)
    winner, fastest = pick_winner(ranked, min_quality), pick_fastest(ranked, min_quality)
    written["table"], written["csv"] = write_table(ranked, out_dir, winner, min_quality, fastest)
    try:
        written["plot"] = plot(ranked, out_dir, winner, min_quality)
    except ImportError as exc:  # the table is what matters: the picture needs the bench extra's matplotlib
        (out_dir / "plot_error.txt").write_text(f"{exc}; install it with: pip install 'hydraserve[bench]'\n")
        log.warning("no comparison.png: %s; install it with: pip install 'hydraserve[bench]'", exc)
    except Exception as exc:  # a plotting failure is noted, not fatal
        (out_dir / "plot_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    picks = (("winner", "recommendation", RECOMMENDED_NAME, "throughput", winner),
             ("fastest", "latency_recommendation", RECOMMENDED_LATENCY_NAME, "latency", fastest))
    for key, file_key, file_name, objective, pick in picks:
        if pick is None:
            continue
        written[key] = pick["config"]
        if recommend:
            written[file_key] = out_dir / file_name
            written[file_key].write_text(recommendation(pick["_run"], row=pick, objective=objective))
    if winner is None and recommend:
        log.warning("no config completed%s: nothing to recommend",
                    f" with quality >= {min_quality}" if min_quality is not None else "")
    log.info("sweep comparison: %s", ", ".join(f"{k}={v}" for k, v in written.items()))
    return written


class SweepReport(Callback):
    """Hydra callback: ``on_multirun_end`` writes the comparison into the sweep folder."""

    def __init__(self, **_: Any) -> None:
        pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        bench = config.get("bench") or {}
        try:
            written = aggregate(sweep_dir, recommend=bool(bench.get("recommend", False)),
                                min_quality=bench.get("min_quality"))
        except Exception as exc:  # never turn a finished sweep into a crash at the very end
            log.error("sweep comparison failed: %s: %s (rebuild it with python -m framework.bench.sweep %s)",
                      type(exc).__name__, exc, sweep_dir)
            return
        if "table" in written:
            print(f"hydraserve bench: comparison of {written['runs']} runs in {written['table']}"
                  + (f"; recommended presets: {written['recommendation']} (throughput)"
                     if "recommendation" in written else "")
                  + (f", {written['latency_recommendation']} (latency)" if "latency_recommendation" in written
                     else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild a hydraserve bench sweep comparison")
    parser.add_argument("sweep_dir")
    parser.add_argument("--recommend", action="store_true",
                        help=f"also write {RECOMMENDED_NAME} and {RECOMMENDED_LATENCY_NAME}")
    parser.add_argument("--min-quality", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = aggregate(args.sweep_dir, args.recommend, args.min_quality)
    return 0 if written.get("runs") else 1


if __name__ == "__main__":
    raise SystemExit(main())
