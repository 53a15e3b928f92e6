"""``hydraserve bench``: start the configured server (or use ``bench.url``), drive open-loop load,
measure the baselines, and write results.json + summary.md + latency.png into the Hydra output folder.

``run(cfg)`` is the body of the CLI's ``@hydra.main(config_name="bench")`` function. In a multirun
(``hydraserve bench -m quantization=none,int8_dynamic``) each job is one config; a config that fails
to start is recorded as failed and the sweep goes on, and ``framework.bench.sweep.SweepReport``
compares the jobs at the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.bench import report
from framework.bench.baselines import BaselineProcess, wait_healthy
from framework.bench.config import BenchSettings, bench_settings
from framework.bench.http_client import get_json
from framework.bench.load import LoadOptions, LoadResult, planned_requests, run_load
from framework.bench.stats import best_stage
from framework.bench.workload import Workload, build
from framework.errors import ConfigError
from framework.plugin import KINDS

log = logging.getLogger("hydraserve.bench")
CONFIG_GROUPS = (*KINDS, "server", "tracing")
# Keys the bench sets itself on the server it starts; a user's value would only collide.
_SERVER_OWNED = ("server.port=", "server.host=")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def server_overrides(task_overrides: list[str]) -> list[str]:
    """The command-line overrides that describe the served config: everything except ``bench``."""
    out = []
    for item in task_overrides:
        key = item.lstrip("+~")
        if key == "bench" or key.startswith(("bench.", "bench=", "hydra.")) or key.startswith(_SERVER_OWNED):
            continue
        out.append(item)
    return out


def _hydra_context() -> tuple[Any | None, bool]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, False
    hc = HydraConfig.get()
    return hc, hc.mode == RunMode.MULTIRUN


def _plain(cfg: DictConfig | dict, key: str) -> Any:
    node = cfg.get(key) if isinstance(cfg, (dict, DictConfig)) else None
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def quality_of(info: Any) -> dict | None:
    """Worst and average quality over the workers' start-up reports in ``GET /info``."""
    if not isinstance(info, dict):
        return None
    found = [e["quality"] for e in info.get("engine") or []
             if isinstance(e, dict) and isinstance(e.get("quality"), dict)]
    mins = [q["min"] for q in found if isinstance(q.get("min"), (int, float))]
    means = [q["mean"] for q in found if isinstance(q.get("mean"), (int, float))]
    if not found:
        return None
    return {"metric": found[0].get("metric", "cosine"), "min": min(mins) if mins else None,
            "mean": sum(means) / len(means) if means else None, "workers": len(found)}


def _info(url: str) -> Any:
    try:
        status, body = asyncio.run(get_json(url, "/info", timeout_s=10.0))
    except Exception as exc:  # /info is for the quality figure: its absence must not fail the run
        log.warning("GET %s/info failed: %s", url, exc)
        return None
    return body if status == 200 else None


def _cache_override(cfg: DictConfig, overrides: list[str], out_dir: Path, settings: BenchSettings) -> list[str]:
    """A cold, private cache for the server the bench starts, so earlier runs cannot warm it."""
    cache = _plain(cfg, "cache") or {}
    if not settings.cold_cache or "directory" not in cache:
        return []
    if any(o.lstrip("+").startswith("cache.directory=") for o in overrides):
        return []
    return [f"cache.directory='{(out_dir / 'cache').resolve()}'"]


def _measure(url: str, settings: BenchSettings, workload: Workload, label: str,
             stop: threading.Event) -> LoadResult:
    options = LoadOptions(
        url=url, path=settings.path, connections=settings.connections, timeout_s=settings.timeout_s,
        drain_s=settings.drain_s, warmup_s=settings.warmup_s, slo_ms=settings.slo_ms, client=settings.client,
        seed=settings.seed, max_requests=settings.max_requests, progress=settings.progress, label=f"{label} ",
        first_answer_timeout_s=settings.startup_timeout_s,
        stream=bool(workload.description.get("streaming")), chat_slo=_chat_slo(settings))
    return run_load(options, settings.stages(), workload, stop=stop, handle_sigint=True)


def _chat_slo(settings: BenchSettings):
    from framework.bench.chat import Slo

    return Slo(settings.slo.ttft_ms, settings.slo.itl_ms, settings.slo.itl_metric)


def served_model(url: str, timeout_s: float = 10.0) -> str | None:
    """The first model id of ``GET /v1/models`` (OpenAI's list), or None when there is none."""
    try:
        status, body = asyncio.run(get_json(url, "/v1/models", timeout_s=timeout_s))
    except Exception as exc:
        log.warning("GET %s/v1/models failed: %s", url, exc)
        return None
    data = body.get("data") if status == 200 and isinstance(body, dict) else None
    ids = [m.get("id") for m in data or [] if isinstance(m, dict) and m.get("id")]
    return str(ids[0]) if ids else None


def _chat_workload(settings: BenchSettings, url: str, results: dict) -> Workload:
    """kind=chat is built once the target is up: the request bodies name its model."""
    spec = _settings_dict(settings)["workload"]
    if not spec.get("model"):
        spec["model"] = served_model(url)
        if spec["model"] is None:
            log.warning("no model id from GET %s/v1/models: requests are sent without \"model\"", url)
    total = planned_requests(settings.stages(), settings.max_requests)
    workload = build(spec, total, settings.headers)
    results["workload"] = {**workload.description, "mix": workload.mix()}
    return workload


def _write_request_rows(outcome: LoadResult, out_dir: Path) -> None:
    """Streamed chat: one row per measured request (TTFT, TPOT, tokens, status) in requests.jsonl."""
    import json

    rows = [{"offered_rate": st.offered_rate, **row} for st in outcome.stages for row in getattr(st, "requests", [])]
    if rows:
        with open(out_dir / "requests.jsonl", "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)


def run_chat(settings: BenchSettings, url: str, output_dir: str | Path | None = None,
             stop: threading.Event | None = None) -> dict:
    """Benchmark an already running OpenAI-compatible server at ``url`` with ``settings`` (a
    streamed chat workload, or any other); returns the results dict, and with ``output_dir`` also
    writes results.json, summary.md, latency.png and requests.jsonl there. For tests and scripts."""
    stop = stop or threading.Event()
    url = url.rstrip("/")
    results: dict[str, Any] = {"status": "ok", "error": None, "config": {"overrides": [], "choices": {}},
                               "bench": _settings_dict(settings), "stages": [], "baselines": {}, "ratios": {},
                               "quality": None, "target": {"url": url, "started_by_bench": False}}
    began = time.perf_counter()
    try:
        if settings.workload.kind == "chat":
            workload = _chat_workload(settings, url, results)
        else:
            workload = build(_settings_dict(settings)["workload"],
                             planned_requests(settings.stages(), settings.max_requests), settings.headers)
            results["workload"] = {**workload.description, "mix": workload.mix()}
        outcome = _measure(url, settings, workload, "hydraserve", stop)
        results["first_answer"] = {"seconds": _r(outcome.first_answer_s), "status": outcome.first_answer_status}
        results["stages"] = outcome.summaries()
        results["best"] = best_stage(results["stages"])
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            _write_request_rows(outcome, Path(output_dir))
        if outcome.interrupted:
            results["status"] = "interrupted"
    except Exception as exc:
        results.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    results["elapsed_s"] = round(time.perf_counter() - began, 3)
    if output_dir is not None:
        report.write_reports(results, output_dir)
    return results


def _log_table(title: str, stages: list[dict]) -> None:
    log.info("%s", title)
    for s in stages:
        if "chat" in s:
            c = s["chat"]
            log.info("  %6g req/s offered: %5d sent, goodput %.2f/s, TTFT p50 %s ms, ITL p50 %s ms, "
                     "%s output tok/s, errors %s", s["offered_rate"], s["sent"], s["goodput"],
                     report.fmt(c["ttft_ms"]["p50"]), report.fmt(c["itl_ms"]["p50"]),
                     report.fmt(c["output_tokens_per_s"], 1), s["errors"] or 0)
            continue
        lat = s["latency_ms"]
        log.info("  %6g req/s offered: %5d sent, goodput %.1f/s, p50 %s ms, p99 %s ms, errors %s",
                 s["offered_rate"], s["sent"], s["goodput"], report.fmt(lat["p50"]), report.fmt(lat["p99"]),
                 s["errors"] or 0)


def run(cfg: DictConfig, overrides: list[str] | None = None, output_dir: str | Path | None = None) -> int:
    """Benchmark the composed config; returns the process exit code (see ``EXIT_*``).

    Under Hydra (the CLI) the overrides and the output folder come from ``HydraConfig``; called
    from Python, pass the ``overrides`` the config was composed with and an ``output_dir``.
    """
    hc, multirun = _hydra_context()
    if output_dir is not None:
        out_dir = Path(output_dir)
    elif hc is not None:
        out_dir = Path(hc.runtime.output_dir)
    else:
        out_dir = Path("outputs/bench") / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overrides is not None:
        task = list(overrides)
    else:
        task = [str(o) for o in hc.overrides.task] if hc is not None else []
    choices = {k: v for k, v in (dict(hc.runtime.choices) if hc is not None else {}).items()
               if not k.startswith("hydra/") and v is not None}
    results: dict[str, Any] = {
        "status": "ok", "error": None,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "output_dir": str(out_dir),
        "config": {"overrides": task, "choices": choices,
                   "groups": {g: _plain(cfg, g) for g in CONFIG_GROUPS if cfg.get(g) is not None}},
        "stages": [], "baselines": {}, "ratios": {}, "quality": None,
    }
    began = time.perf_counter()
    stop = threading.Event()
    code = EXIT_OK
    try:
        settings = bench_settings(cfg)
        results["bench"] = _settings_dict(settings)
        if settings.url is None:
            from framework.config import validate

            validate(cfg)  # every config problem now, before a server process starts
        code = _run_benchmark(cfg, settings, task, out_dir, results, stop)
    except ConfigError as exc:
        results.update(status="failed", error=str(exc))
        print(str(exc), file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        results.update(status="interrupted")
        code = EXIT_INTERRUPTED
    except Exception as exc:
        results.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        log.error("bench failed: %s", results["error"])
        code = EXIT_FAILED
    finally:
        results["elapsed_s"] = round(time.perf_counter() - began, 3)
        written = report.write_reports(results, out_dir)
        log.info("bench reports: %s", ", ".join(str(p) for p in written.values()))
    if code == EXIT_INTERRUPTED and multirun:
        _report_partial_sweep(hc)
        raise SystemExit(EXIT_INTERRUPTED)  # Ctrl-C ends the whole sweep, not just this job
    if multirun and code != EXIT_OK:
        return EXIT_OK  # a config that fails is a "failed" row in the comparison; the sweep goes on
    return code


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _settings_dict(settings: BenchSettings) -> dict:
    import dataclasses

    return dataclasses.asdict(settings)


def _run_benchmark(cfg: DictConfig, settings: BenchSettings, task: list[str], out_dir: Path,
                   results: dict, stop: threading.Event) -> int:
    total = planned_requests(settings.stages(), settings.max_requests)
    chat = settings.workload.kind == "chat"
    workload = None if chat else build(_settings_dict(settings)["workload"], total, settings.headers)
    if workload is not None:
        results["workload"] = {**workload.description, "mix": workload.mix()}

    def measure_target(url: str) -> None:
        nonlocal workload
        if chat:
            workload = _chat_workload(settings, url, results)
        info = _info(url)
        results["quality"] = quality_of(info)
        if isinstance(info, dict):
            results["server_info"] = {k: info.get(k) for k in ("hydraserve", "model", "engine", "transport",
                                                                "plugins")}
        outcome = _measure(url, settings, workload, "hydraserve", stop)
        results["first_answer"] = {"seconds": _r(outcome.first_answer_s), "status": outcome.first_answer_status}
        results["stages"] = outcome.summaries()
        results["best"] = best_stage(results["stages"])
        _write_request_rows(outcome, out_dir)
        _log_table("hydraserve", results["stages"])
        if outcome.interrupted:
            raise KeyboardInterrupt

    if settings.url:
        wait_healthy(settings.url.rstrip("/"), settings.startup_timeout_s)
        results["target"] = {"url": settings.url, "started_by_bench": False}
        measure_target(settings.url.rstrip("/"))
    else:
        from framework.launch import ServerProcess

        overrides = server_overrides(task)
        overrides += _cache_override(cfg, overrides, out_dir, settings)
        results["config"]["server_overrides"] = overrides
        log.info("starting hydraserve: %s", " ".join(overrides) or "(defaults)")
        with ServerProcess(overrides, startup_timeout=settings.startup_timeout_s,
                           output_dir=str(out_dir / "server")) as server:
            results["target"] = {"url": server.url, "started_by_bench": True}
            measure_target(server.url)

    plain_cfg = {k: _plain(cfg, k) for k in CONFIG_GROUPS if cfg.get(k) is not None}
    for name in settings.baselines:
        if stop.is_set():
            break
        try:
            with BaselineProcess(name, plain_cfg, path=settings.path, log_dir=out_dir,
                                 startup_timeout=settings.startup_timeout_s) as base:
                outcome = _measure(base.url, settings, workload, name, stop)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a baseline that cannot run is reported, the run still counts
            log.warning("baseline %s failed: %s", name, exc)
            results["baselines"][name] = {"error": f"{type(exc).__name__}: {exc}", "stages": []}
            continue
        stages = outcome.summaries()
        results["baselines"][name] = {"url": base.url, "stages": stages, "best": best_stage(stages),
                                      "first_answer": {"seconds": _r(outcome.first_answer_s),
                                                       "status": outcome.first_answer_status}}
        results["ratios"][name] = report.ratios(results["stages"], stages)
        _log_table(f"baseline {name}", stages)
        if outcome.interrupted:
            raise KeyboardInterrupt
    return EXIT_OK


def _report_partial_sweep(hc: Any) -> None:
    try:
        from framework.bench.sweep import aggregate

        aggregate(Path(hc.sweep.dir))
    except Exception as exc:
        log.warning("could not write the partial sweep comparison: %s", exc)
