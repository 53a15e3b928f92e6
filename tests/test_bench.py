"""``hydraserve bench``: open-loop load, stats, workloads, reports, sweeps and recommendations.

Most tests drive an in-process HTTP/1.1 test server (a thread with its own event loop) that can
stall on demand and marks repeated bodies as cache hits; one test runs the real CLI against a real
``model=echo`` server. Rate and latency checks use wide margins: they assert behaviour (the
schedule is kept, a stall is not hidden), not speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.bench import report, sweep
from framework.bench.app import quality_of, server_overrides
from framework.bench.config import bench_settings
from framework.bench.load import LoadOptions, Stage, arrival_offsets, drive, run_load
from framework.bench.workload import (
    build,
    load_jsonl,
    paraphrases,
    text_workload,
    vector_workload,
    write_jsonl,
)
from framework.config import compose, conf_dir
from framework.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ test server
class TestServer:
    """Keep-alive HTTP/1.1 on 127.0.0.1. ``stall_at=N``: request N holds every other request back
    for ``stall_s`` (a GC pause, a recompilation). ``X-Cache: hit`` for a body seen before."""

    __test__ = False

    def __init__(self, stall_at: int | None = None, stall_s: float = 0.0):
        self.stall_at, self.stall_s = stall_at, stall_s
        self.count = 0
        self.seen: set[bytes] = set()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._lock = asyncio.Lock()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)  # open keep-alive connections: close them cleanly
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")), 0)
                body = await reader.readexactly(length) if length else b""
                if path == "/health":
                    self._reply(writer, b"ok")
                elif path == "/info":
                    info = {"engine": [{"quality": {"metric": "cosine", "min": 0.991, "mean": 0.997}}]}
                    self._reply(writer, json.dumps(info).encode())
                else:
                    self.count += 1
                    async with self._lock:
                        if self.count == self.stall_at:
                            await asyncio.sleep(self.stall_s)
                    cache = "hit" if body in self.seen else "miss"
                    self.seen.add(body)
                    self._reply(writer, b'{"output": 1}', cache)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, data: bytes, cache: str | None = None) -> None:
        extra = f"X-Cache: {cache}\r\n" if cache else ""
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"{extra}\r\n".encode() + data)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TestServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _options(url: str, **kw) -> LoadOptions:
    return LoadOptions(url=url, use_uvloop=False, **{"timeout_s": 5.0, "drain_s": 5.0, **kw})


# ------------------------------------------------------------------------------------- load / stats
def test_constant_rate_is_kept_and_every_request_is_answered():
    with TestServer() as srv:
        result = run_load(_options(srv.url, connections=8), [Stage(200, 2.0)], text_workload(400))
    s = result.summaries()[0]
    assert s["sent"] == 400 and s["ok"] == 400 and s["errors"] == {}
    assert s["achieved_send_rate"] == pytest.approx(200, rel=0.05)
    assert s["throughput"] == pytest.approx(200, rel=0.05)
    assert s["goodput"] == pytest.approx(200, rel=0.05)  # nothing near the 100 ms SLO
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]


def test_poisson_and_step_sweep_schedules():
    import random

    offsets = arrival_offsets(Stage(500, 4.0, "poisson"), random.Random(1), 10_000)
    assert len(offsets) == pytest.approx(2000, rel=0.1)
    gaps = {round(b - a, 6) for a, b in zip(offsets, offsets[1:], strict=False)}
    assert len(gaps) > 100  # random spacing, not a fixed interval
    assert arrival_offsets(Stage(10, 1.0), random.Random(0), 10_000) == [i / 10 for i in range(10)]
    assert len(arrival_offsets(Stage(1000, 10.0), random.Random(0), 50)) == 50  # max_requests caps it

    with TestServer() as srv:
        result = run_load(_options(srv.url), [Stage(50, 0.5), Stage(100, 0.5)], text_workload(100))
    assert [s["offered_rate"] for s in result.summaries()] == [50, 100]
    assert [s["sent"] for s in result.summaries()] == [25, 50]


def test_a_server_stall_shows_in_intended_time_latency_not_only_in_service_time():
    # Request 60 holds the server for 0.6 s; 2 connections; 100 req/s. Requests scheduled during the
    # stall wait on the client side: a closed-loop client would not even have sent them.
    with TestServer(stall_at=60, stall_s=0.6) as srv:
        result = run_load(_options(srv.url, connections=2), [Stage(100, 2.0)], text_workload(200))
    s = result.summaries()[0]
    assert s["ok"] == 200
    lat, svc = s["latency_ms"], s["service_ms"]
    assert lat["max"] >= 500  # the stall is in the numbers...
    assert lat["p90"] > 2 * svc["p90"]  # ...for every request scheduled during it, not just the stalled one
    assert lat["mean"] > svc["mean"]
    assert s["send_lag_ms"]["max"] >= 400  # and the report says the requests left late


def test_stop_event_ends_the_run_and_keeps_what_was_measured(tmp_path):
    stop = threading.Event()
    with TestServer() as srv:
        threading.Timer(0.7, stop.set).start()
        began = time.monotonic()
        result = asyncio.run(drive(_options(srv.url), [Stage(100, 20.0), Stage(200, 20.0)],
                                   text_workload(50), stop))
    assert time.monotonic() - began < 10  # far less than the 40 s scheduled
    assert result.interrupted and len(result.stages) == 1
    s = result.summaries()[0]
    assert 0 < s["ok"] < s["planned"]
    written = report.write_reports({"status": "interrupted", "stages": result.summaries(),
                                    "bench": {"slo_ms": 100}}, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "interrupted" and saved["stages"][0]["ok"] == s["ok"]
    assert {"results", "summary", "plot"} <= set(written)


def test_timeouts_and_refused_connections_are_counted_by_kind():
    with TestServer(stall_at=3, stall_s=2.0) as srv:
        result = run_load(_options(srv.url, connections=1, timeout_s=0.3, drain_s=0.5), [Stage(20, 0.3)],
                          text_workload(10))
    errors = result.summaries()[0]["errors"]
    assert errors.get("timeout", 0) >= 1
    from framework.bench.baselines import free_port

    result = run_load(_options(f"http://127.0.0.1:{free_port()}"), [Stage(20, 0.2)], text_workload(10))
    assert result.summaries()[0]["errors"] == {"connect_error": 4}


def test_only_loopback_targets_are_accepted():
    with pytest.raises(ConfigError, match="bench.url"):
        bench_settings({"url": "http://192.0.2.1:8000"})
    bench_settings({"url": "http://localhost:8000"})
    bench_settings({"url": "http://[::1]:8000"})


# -------------------------------------------------------------------------------------- workloads
def test_generated_text_workload_has_the_requested_mix():
    wl = text_workload(1000, repeat_ratio=0.3, paraphrase_ratio=0.2, seed=3)
    assert wl.mix() == {"fresh": 0.5, "repeat": 0.3, "paraphrase": 0.2}
    bodies = [r.body for r in wl.requests]
    fresh = [r.body for r in wl.requests if r.kind == "fresh"]
    assert len(set(fresh)) == len(fresh) == 500  # new sentences are new
    assert wl.requests[0].kind == "fresh"
    for i, req in enumerate(wl.requests):
        earlier = set(bodies[:i])
        if req.kind == "repeat":
            assert req.body in earlier
        elif req.kind == "paraphrase":
            assert req.body not in set(fresh)
            text = json.loads(req.body)["input"]
            assert any(text in paraphrases(json.loads(b)["input"]) for b in earlier & set(fresh))
    assert [r.body for r in text_workload(1000, 0.3, 0.2, seed=3).requests] == bodies  # seeded
    assert [r.body for r in text_workload(1000, 0.3, 0.2, seed=4).requests] != bodies
    assert not {r.body for r in wl.warmup} & set(bodies)  # warm-up never pre-fills the cache


def test_repeats_become_cache_hits_at_the_requested_ratio():
    wl = text_workload(300, repeat_ratio=0.3, seed=0)
    with TestServer() as srv:
        result = run_load(_options(srv.url), [Stage(300, 1.0)], wl)
    assert result.summaries()[0]["cache_hit_ratio"] == pytest.approx(0.3, abs=0.01)


def test_vector_workload_and_items_per_request():
    wl = vector_workload(20, dim=8, repeat_ratio=0.5, items_per_request=3, seed=1)
    body = json.loads(wl.requests[0].body)
    assert len(body["input"]) == 3 and all(len(v) == 8 for v in body["input"])
    assert wl.mix()["repeat"] == 0.5
    many = text_workload(5, items_per_request=2)
    assert all(len(json.loads(r.body)["input"]) == 2 for r in many.requests)


def test_jsonl_workload_round_trip_and_errors(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"input": "a"}\n\n{"body": {"input": "b"}, "headers": {"X-Request-Timeout-Ms": "50"}}\n'
                    '{"body": "not an envelope", "other": 1}\n')
    wl = load_jsonl(path, headers={"X-Api": "k"})
    assert [json.loads(r.body) for r in wl.requests] == [
        {"input": "a"}, {"input": "b"}, {"body": "not an envelope", "other": 1}]
    assert wl.requests[1].headers == {"X-Api": "k", "X-Request-Timeout-Ms": "50"}
    again = load_jsonl(write_jsonl(wl, tmp_path / "copy.jsonl"))
    assert [r.body for r in again.requests] == [r.body for r in wl.requests]
    (tmp_path / "bad.jsonl").write_text('{"input": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="bench.workload.path"):
        build({"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")}, 10)


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("profile", sorted(p.stem for p in (conf_dir() / "bench").glob("*.yaml")))
def test_every_bench_profile_composes_and_validates(profile):
    cfg = compose([f"bench={profile}", "quantization=int8_dynamic", "batching=none"], config_name="bench")
    assert cfg.quantization.name == "int8_dynamic" and cfg.batching.name == "none"  # serve groups apply
    settings = bench_settings(cfg)
    assert settings.stages() and settings.slo_ms > 0
    assert _hydra_node([f"bench={profile}"]).callbacks.sweep_report._target_ == "framework.bench.sweep.SweepReport"


def _hydra_node(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides, return_hydra_config=True).hydra


def test_bench_config_errors_are_listed_together():
    with pytest.raises(ConfigError) as err:
        bench_settings({"rates": [0], "client": "curl", "workload": {"repeat_ratio": 0.8,
                                                                      "paraphrase_ratio": 0.5}, "typo": 1})
    text = str(err.value)
    for key in ("bench.rates", "bench.client", "bench.workload.repeat_ratio", "bench.typo"):
        assert key in text


def test_server_overrides_drop_bench_and_port_keys():
    task = ["model=echo", "bench=quick", "bench.rates=[1,2]", "+bench.x=1", "server.port=9000",
            "quantization=int8_dynamic", "experiment=cpu_low_latency", "batching.max_batch_size=8"]
    assert server_overrides(task) == ["model=echo", "quantization=int8_dynamic", "experiment=cpu_low_latency",
                                      "batching.max_batch_size=8"]


def test_quality_is_read_from_the_workers_start_up_reports():
    info = {"engine": [{"quality": {"metric": "cosine", "min": 0.99, "mean": 0.995}},
                       {"quality": {"metric": "cosine", "min": 0.98, "mean": 0.993}}, {"quality": None}]}
    assert quality_of(info) == {"metric": "cosine", "min": 0.98, "mean": pytest.approx(0.994), "workers": 2}
    assert quality_of({"engine": [{"quality": None}]}) is None
    assert quality_of("not json") is None


# ------------------------------------------------------------------------------------ app + reports
def _bench_cfg(url: str, *extra: str):
    return compose(["model=echo", "cache=none", f"bench.url={url}", "bench.rates=[50,100]", "bench.duration_s=0.5",
                    "bench.warmup_s=0.2", "bench.progress=false", "bench.workload.repeat_ratio=0.25", *extra],
                   config_name="bench")


def test_app_against_a_running_server_writes_every_report(tmp_path):
    from framework.bench.app import run

    with TestServer() as srv:
        code = run(_bench_cfg(srv.url, "bench.baselines=[fastapi_echo]"), overrides=["model=echo"],
                   output_dir=tmp_path)
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "ok" and [s["offered_rate"] for s in res["stages"]] == [50, 100]
    assert res["quality"]["min"] == 0.991
    assert res["stages"][1]["cache_hit_ratio"] > 0
    echo = res["baselines"]["fastapi_echo"]
    assert [s["ok"] for s in echo["stages"]] == [25, 50]
    assert [r["offered_rate"] for r in res["ratios"]["fastapi_echo"]] == [50, 100]
    md = (tmp_path / "summary.md").read_text()
    assert "baseline: fastapi_echo" in md and "hydraserve / fastapi_echo" in md and "cosine min 0.9910" in md
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_app_reports_a_server_that_is_not_there(tmp_path):
    from framework.bench.app import run
    from framework.bench.baselines import free_port

    cfg = _bench_cfg(f"http://127.0.0.1:{free_port()}", "bench.startup_timeout_s=0.5")
    assert run(cfg, overrides=[], output_dir=tmp_path) == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and "/health" in res["error"]


def test_litserve_raw_baseline_serves_the_model_through_its_hooks():
    import httpx

    from framework.bench.baselines import BaselineProcess, batch_settings

    cfg = OmegaConf.to_container(compose(["model=echo", "cache=none", "batching=dynamic"]), resolve=True)
    cfg.pop("hydra", None)
    assert batch_settings(cfg["batching"]) == (cfg["batching"]["max_batch_size"],
                                               cfg["batching"]["max_delay_ms"] / 1000)
    with BaselineProcess("litserve_raw", cfg, startup_timeout=120) as base:
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert client.post(base.url + "/predict", json={"input": ["a", "b"]}).json() == {"output": ["a", "b"]}
            bad = client.post(base.url + "/predict", json={"nope": 1})
            assert bad.status_code == 422 and "input" in bad.text


# ----------------------------------------------------------------------------------------- sweeps
def _fake_run(folder: Path, overrides: list[str], goodput_by_rate: dict, quality: dict | None,
              status: str = "ok") -> None:
    cfg = compose(overrides, config_name="bench")
    groups = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in sweep.PLUGIN_AND_FRAMEWORK_GROUPS}
    choices = {"model": "minilm", "quantization": cfg.quantization.name, "batching": cfg.batching.name,
               "cache": cfg.cache.name, "hardware": cfg.hardware.name, "server": "default",
               "tracing": "file", "bench": "sweep"}
    stages = [{"offered_rate": rate, "sent": int(rate * 10), "ok": int(rate * 10), "goodput": good,
               "throughput": good, "error_rate": 0.0, "cache_hit_ratio": None,
               "latency_ms": {"p50": 1000 / good, "p90": 2000 / good, "p95": 2500 / good, "p99": 3000 / good,
                              "max": 4000 / good}} for rate, good in goodput_by_rate.items()]
    if status == "failed":
        stages = []
    folder.mkdir(parents=True)
    report.write_results({"status": status, "error": "RuntimeError: worker died\nmore" if stages == [] else None,
                          "config": {"overrides": overrides, "choices": choices, "groups": groups},
                          "bench": {"slo_ms": 100}, "stages": stages, "quality": quality,
                          "ratios": {"fastapi_echo": [{"offered_rate": r, "p50": 1.5, "p99": 1.2, "goodput": 1.0}
                                                      for r in goodput_by_rate]}}, folder)


def _fake_sweep(root: Path) -> None:
    _fake_run(root / "0", ["quantization=none", "batching=none"], {10: 10.0, 20: 15.0}, None)
    _fake_run(root / "1", ["quantization=int8_dynamic", "batching=dynamic", "batching.max_batch_size=16"],
              {10: 10.0, 20: 19.5}, {"metric": "cosine", "min": 0.996, "mean": 0.998})
    _fake_run(root / "2", ["quantization=int4_weight_only", "batching=dynamic"], {10: 10.0, 20: 19.9},
              {"metric": "cosine", "min": 0.93, "mean": 0.95})
    _fake_run(root / "3", ["quantization=fp16", "batching=none"], {}, None, status="failed")


def test_sweep_report_ranks_configs_and_writes_table_csv_plot(tmp_path):
    _fake_sweep(tmp_path)
    written = sweep.aggregate(tmp_path, recommend=True, min_quality=0.99)
    assert written["runs"] == 4
    md = (tmp_path / "comparison.md").read_text()
    order = [md.index(s) for s in ("int4_weight_only", "int8_dynamic", "quantization=none", "fp16")]
    assert order == sorted(order)  # goodput 19.9 > 19.5 > 15, the failed run last
    assert "cosine min 0.9960" in md and "| reference |" in md and "worker died" in md
    assert "quality below bench.min_quality=0.99" in md and "**recommended: throughput, latency**" in md
    import csv

    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "-"]
    assert rows[0]["goodput_rps"] == "19.9" and rows[0]["quality_min"] == "0.93"
    assert rows[0]["vs_fastapi_echo_p50"] == "1.5"
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # int4 is faster but below min_quality=0.99: the recommendation is int8
    assert written["winner"].startswith("quantization=int8_dynamic")


def test_a_sweep_report_is_rebuilt_without_the_bench_extra(tmp_path):
    # `python -m framework.bench.sweep DIR` where hdrhistogram and matplotlib are not installed: the
    # table and the CSV are written, and the missing picture names the install.
    _fake_sweep(tmp_path)
    block = "import sys; sys.modules.update(hdrh=None, matplotlib=None); from framework.bench.sweep import main; "
    done = subprocess.run([sys.executable, "-c", block + f"raise SystemExit(main([{str(tmp_path)!r}]))"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "comparison.md").exists() and (tmp_path / "comparison.csv").exists()
    assert "pip install 'hydraserve[bench]'" in (tmp_path / "plot_error.txt").read_text()


def test_a_chat_sweep_table_shows_the_token_pace_and_the_chat_slo(tmp_path):
    def chat(ttft, tpot, tokens_per_s):
        return {"slo": {"ttft_ms": 1000, "itl_ms": 100, "itl_metric": "tpot"}, "ttft_ms": {"p50": ttft},
                "tpot_ms": {"p50": tpot}, "output_tokens_per_s": tokens_per_s}

    for i, (seqs, paces) in enumerate([(4, [(150.0, 40.0, 30.0), (900.0, 60.0, 55.0)]),
                                       (16, [(300.0, 55.0, 28.0), (400.0, 70.0, 90.0)])]):
        folder = tmp_path / str(i)
        _fake_run(folder, ["batching=continuous", f"batching.max_num_seqs={seqs}"], {0.5: 0.5, 2: 1.0 + i}, None)
        res = json.loads((folder / "results.json").read_text())
        for stage, pace in zip(res["stages"], paces, strict=True):
            stage["chat"] = chat(*pace)
            stage["latency_ms"]["p50"] = pace[0] + 63 * pace[1]  # the answer's last token: 64 of them
        report.write_results(res, folder)
    written = sweep.aggregate(tmp_path, recommend=True)
    md = (tmp_path / "comparison.md").read_text()
    assert "TTFT <= 1000 ms and TPOT <= 100 ms" in md and "100 ms SLO" not in md
    lines = {line.split("`")[1]: line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")}
    # max_num_seqs=16 ranks first (goodput 2 at 2 req/s); at the lowest rate max_num_seqs=4 paces faster.
    assert md.index("max_num_seqs=16") < md.index("max_num_seqs=4")
    assert "| 400.00 | 70.00 | 90.0 |" in lines["batching.max_num_seqs=16"]
    assert lines["batching.max_num_seqs=16"].rstrip().endswith("| 3765.00 | ok **recommended: throughput** |")
    assert lines["batching.max_num_seqs=4"].rstrip().endswith(
        "| 150.00 | 40.00 | 2670.00 | ok **recommended: latency** |")
    # one sweep, two presets: the throughput winner and the one that answers a lone request first
    assert written["winner"] == "batching.max_num_seqs=16" and written["fastest"] == "batching.max_num_seqs=4"
    latency = (tmp_path / sweep.RECOMMENDED_LATENCY_NAME).read_text()
    throughput = (tmp_path / sweep.RECOMMENDED_NAME).read_text()
    assert latency.startswith("# @package _global_\n# Recommended for latency") and "TPOT p50 40.00 ms" in latency
    assert "max_num_seqs: 4" in latency and "max_num_seqs" not in throughput  # 16 is continuous.yaml's own


def test_recommended_experiment_composes_to_the_winning_config(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    sweep.aggregate(tmp_path / "sweep", recommend=True, min_quality=0.99)
    text = (tmp_path / "sweep" / sweep.RECOMMENDED_NAME).read_text()
    assert text.startswith("# @package _global_")
    search = tmp_path / "conf_extra"
    (search / "experiment").mkdir(parents=True)
    shutil.copy(tmp_path / "sweep" / sweep.RECOMMENDED_NAME, search / "experiment" / "bench_best.yaml")
    cfg = compose([f"hydra.searchpath=[file://{search}]", "experiment=bench_best"])
    assert cfg.quantization.name == "int8_dynamic"
    assert cfg.batching.name == "dynamic" and cfg.batching.max_batch_size == 16
    winner = compose(["quantization=int8_dynamic", "batching=dynamic", "batching.max_batch_size=16"])
    for group in ("model", "quantization", "batching", "cache", "hardware"):
        assert cfg[group] == winner[group]
    from framework.config import validate

    validate(cfg)


def test_sweep_callback_uses_the_multirun_folder(tmp_path):
    _fake_sweep(tmp_path)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                               "bench": {"recommend": False, "min_quality": None}})
    sweep.SweepReport().on_multirun_end(config=config)
    assert (tmp_path / "comparison.md").is_file() and not (tmp_path / sweep.RECOMMENDED_NAME).exists()


# --------------------------------------------------------------------------------------- the CLI
def _cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRASERVE_CACHE_DIR": str(cwd / "cache")}
    return subprocess.Popen([sys.executable, "-m", "framework.cli", "bench", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_cli_multirun_writes_one_comparison_through_the_hydra_callback(tmp_path):
    with TestServer() as srv:
        proc = _cli(["-m", f"bench.url={srv.url}", "bench.slo_ms=0.001,1000", "bench.rates=[50]",
                     "bench.duration_s=0.5", "bench.warmup_s=0", "bench.progress=false", "bench.baselines=[]",
                     "bench.recommend=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
    md = (tmp_path / "sweep" / "comparison.md").read_text()
    assert md.index("bench.slo_ms=1000") < md.index("bench.slo_ms=0.001")  # goodput ranks them
    rec = (tmp_path / "sweep" / sweep.RECOMMENDED_NAME).read_text()
    assert "# @package _global_" in rec


def test_ctrl_c_stops_the_cli_and_still_writes_results(tmp_path):
    with TestServer() as srv:
        proc = _cli([f"bench.url={srv.url}", "bench.rates=[50]", "bench.duration_s=60", "bench.warmup_s=0",
                     "bench.progress=false", "bench.baselines=[]", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
        deadline = time.monotonic() + 60
        while srv.count < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode()[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "interrupted"
    # The server saw >= 20 requests before Ctrl-C; one or two may still have been in flight then.
    assert res["stages"][0]["ok"] >= 15 and res["stages"][0]["ok"] < res["stages"][0]["planned"]
    assert (tmp_path / "run" / "summary.md").is_file()


def test_cli_bench_starts_the_real_server(tmp_path):
    proc = _cli(["model=echo", "cache=disk", "bench=quick", "bench.rates=[20]", "bench.duration_s=1",
                 "bench.warmup_s=0.5", "bench.progress=false", "bench.baselines=[]", "tracing=none",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out.decode()[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["target"]["started_by_bench"] and res["stages"][0]["ok"] == 20
    assert res["first_answer"]["status"] == 200
    # the bench's server caches in the run folder: a previous run cannot warm it
    assert any(o.startswith("cache.directory=") for o in res["config"]["server_overrides"])
    assert (tmp_path / "run" / "cache").is_dir()
