"""Every picture the bench writes renders from a small fixed result (a person judges how it looks),
and the bench-only packages (the ``bench`` extra) stay out of what ``hydraserve serve`` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from framework.bench import report, sweep

ROOT = Path(__file__).resolve().parent.parent
MIN_BYTES = 20_000  # an empty 110-dpi figure with two titled axes is already ~15 KB; real plots are larger


def _is_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > MIN_BYTES, f"{path}: only {len(data)} bytes"


def _stage(rate: float, p50: float, ok: int = 50, goodput: float | None = None) -> dict:
    return {"offered_rate": rate, "sent": ok, "ok": ok, "achieved_send_rate": rate, "throughput": rate * 0.98,
            "goodput": rate * 0.95 if goodput is None else goodput, "error_rate": 0.0, "errors": {},
            "cache_hit_ratio": None,
            "latency_ms": {"p50": p50, "p90": p50 * 1.8, "p95": p50 * 2.2, "p99": p50 * 3.5, "max": p50 * 5,
                           "mean": p50 * 1.2},
            "send_lag_ms": {"p99": 0.5}}


def _results(rates: list[float], baselines: bool = True) -> dict:
    res = {"status": "ok", "bench": {"slo_ms": 100},
           "config": {"choices": {"model": "echo", "quantization": "none", "batching": "none"}},
           "stages": [_stage(r, 4 + r / 10) for r in rates]}
    if baselines:
        res["baselines"] = {"fastapi_echo": {"stages": [_stage(r, 2 + r / 20) for r in rates]},
                            "litserve_raw": {"stages": [_stage(r, 5 + r / 8) for r in rates]},
                            "broken": {"error": "RuntimeError: did not start\nmore"}}
    return res


@pytest.mark.parametrize("rates", [[50.0], [10.0, 20.0, 40.0, 80.0]], ids=["one-rate", "sweep"])
def test_latency_png_renders_with_baselines(tmp_path, rates):
    path = report.plot_latency(_results(rates), tmp_path)
    assert path == tmp_path / "latency.png"
    _is_png(path)


def test_latency_png_renders_without_baselines_and_not_without_answers(tmp_path):
    _is_png(report.plot_latency(_results([5.0, 10.0], baselines=False), tmp_path))
    assert report.plot_latency({"stages": [{"offered_rate": 5, "ok": 0}]}, tmp_path / "none") is None


def test_chat_png_renders_the_cdfs(tmp_path):
    pcts = [50.0, 90.0, 99.0, 99.9]

    def chat_stage(rate: float) -> dict:
        return {"offered_rate": rate, "sent": 10, "ok": 10, "errors": {}, "goodput": rate * 0.9,
                "chat": {"requests_per_s": rate, "goodput": rate * 0.9, "output_tokens_per_s": rate * 60,
                         "cdf": {"percentiles": pcts, "ttft_ms": [20 * rate, 35 * rate, 60 * rate, 80 * rate],
                                 "itl_ms": [8.0, 12.0, 30.0, 45.0]}}}

    res = {"status": "ok", "bench": {"slo": {"ttft_ms": 1000, "itl_ms": 100, "itl_metric": "tpot"}},
           "stages": [chat_stage(0.5), chat_stage(1.0), chat_stage(2.0)]}
    assert report.is_chat(res)
    _is_png(report.plot_latency(res, tmp_path))


def _sweep_row(rank: int, config: str, goodput: float, quality: float | None, rates: list[float]) -> dict:
    run = {"stages": [_stage(r, 300 / goodput + r) for r in rates]}
    return {"rank": rank, "config": config, "goodput_rps": goodput, "at_offered_rps": rates[-1], "slo_ms": 100,
            "p99_ms": 10.0, "quality_min": quality, "quality_metric": None if quality is None else "cosine",
            "_run": run}


@pytest.mark.parametrize("rates", [[20.0], [10.0, 20.0]], ids=["one-rate", "sweep"])
def test_comparison_png_renders_with_numbers_and_the_recommendation(tmp_path, rates):
    ranked = [_sweep_row(1, "quantization=int4_weight_only batching=dynamic", 19.9, 0.93, rates),
              _sweep_row(2, "quantization=int8_dynamic batching=dynamic batching.max_batch_size=16", 19.5, 0.996,
                         rates),
              _sweep_row(3, "quantization=none batching=none", 15.0, None, rates),
              {"rank": "-", "config": "quantization=fp16", "goodput_rps": None, "quality_min": None, "_run": {}}]
    path = sweep.plot(ranked, tmp_path, winner=ranked[1], min_quality=0.99)
    assert path == tmp_path / "comparison.png"
    _is_png(path)
    # no winner at all (every config below the floor) still draws
    (tmp_path / "no_winner").mkdir()
    _is_png(sweep.plot(ranked, tmp_path / "no_winner", winner=None))


def test_batching_png_renders_every_policy(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import batching
    finally:
        sys.path.remove(str(ROOT))
    capacity = 60.0
    fractions = [0.1, 0.25, 0.5, 0.75, 1.0, 1.2]

    def stages(knee: float) -> list[dict]:
        out = []
        for f in fractions:
            s = _stage(f * capacity, 20 if f < knee else 20 * (1 + 10 * (f - knee)))
            s["throughput"] = min(f, knee + 0.1) * capacity
            out.append(s)
        return out

    results = {name: {"stages": stages(knee)} for name, knee in
               (("none", 0.8), ("dynamic_2ms", 1.1), ("dynamic_10ms", 1.5), ("adaptive", 1.3))}
    path = tmp_path / "batching.png"
    batching.plot(path, results, slo_ms=100.0, capacity=capacity)
    _is_png(path)


# ------------------------------------------------------------------------------ the bench extra
_BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None  # what an install without the extra looks like\n"


def _run(code: str, cwd: Path, mods=("matplotlib", "hdrh", "tqdm", "httpx")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK.format(mods=list(mods)) + code], cwd=cwd,
                          capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("missing", ["matplotlib", "hdrh", "tqdm", "httpx"])
def test_bench_without_the_extra_says_how_to_install_it(tmp_path, missing):
    result = _run("from framework.cli import main\nsys.exit(main(['bench', 'model=echo']))", tmp_path, [missing])
    assert result.returncode == 2, result.stderr
    assert "pip install 'hydraserve[bench]'" in result.stderr
    assert {"hdrh": "hdrhistogram"}.get(missing, missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_bench_module_that_fails_to_import_gives_the_same_hint(tmp_path):
    # find_spec sees the package, the import still fails (a broken install): the task's guard answers.
    code = ("import framework.cli as cli\ncli._bench_missing = lambda: []\n"
            "sys.exit(cli.main(['bench', 'model=echo', 'hydra/job_logging=none', 'hydra/hydra_logging=none']))")
    result = _run(code, tmp_path, ["httpx"])
    assert result.returncode == 2, result.stderr
    assert "pip install 'hydraserve[bench]'" in result.stderr and "httpx" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_side_loads_nothing_from_the_bench_extra(tmp_path):
    code = ("import framework.cli, framework.composer, framework.server, framework.config\n"
            "from framework.cli import main\n"
            "code = main(['validate', 'model=echo', 'cache=none'])\n"
            "from framework.config import compose, validate\n"
            "validate(compose(['model=echo', 'cache=none']))\n"
            "sys.exit(code)")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Config is well-formed" in result.stdout
