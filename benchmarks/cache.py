"""What a cache hit costs, against the floor: a plain FastAPI + uvicorn endpoint on loopback.

One run starts, side by side, a plain FastAPI echo (the floor: parse the JSON body, return canned
bytes of the same size as the cached answer) and three hydraserve servers (``cache=disk``,
``cache=memory``, ``cache=semantic``, tracing off), then measures at concurrency 1 with a raw
keep-alive socket client (httpx alone costs ~1 ms a request here):

* disk-cache hit, memory-cache hit, semantic hit (a paraphrase of a cached request);
* a miss: the model runs (``Cache-Control: no-cache`` bypasses the cache);

each in blocks interleaved with blocks of the floor, so every ratio compares measurements taken
moments apart. Goal: disk-cache hit p50 <= 1.3x the floor's p50. With Debian's ``redis-server``
installed, two ``cache=redis`` servers join (one with its in-process front, one without, so every hit
is a Redis round trip); goal: a Redis hit p50 <= 1.5x a disk hit's. Writes benchmarks/results/cache.md.

    python benchmarks/cache.py            # model=minilm, 3 rounds of 1000 requests per scenario
    python benchmarks/cache.py --quick    # model=echo, one round of 150: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Module level: FastAPI resolves these (string, postponed) annotations in the module's globals.
from fastapi import Request, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
GOAL_REDIS_VS_DISK = 1.5  # issue 22: a hit from Redis vs a hit from the disk cache
GOAL_DISK_P50_RATIO = 1.3


# ------------------------------------------------------------------------------------ the floor
def serve_floor(port: int) -> None:
    """The floor: the least a FastAPI JSON endpoint does (parse the body, answer with bytes)."""
    import orjson
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    canned = [b"{}"]

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(canned[0], media_type="application/json")

    @app.put("/canned")
    async def set_canned(request: Request) -> Response:
        canned[0] = await request.body()
        return Response(b"{}", media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response(b"ok")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class FloorProcess:
    def __init__(self) -> None:
        from framework.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> FloorProcess:
        import httpx

        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-floor", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("the FastAPI floor server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()


# ----------------------------------------------------------------------------------- measuring
@dataclass
class Scenario:
    name: str
    server: str  # which server answers it: "disk", "memory" or "semantic"
    text: str
    headers: dict = field(default_factory=dict)
    expect: str = "hit"  # the X-Cache header every measured answer must carry
    samples: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # floor blocks interleaved with this scenario


def body_of(text: str) -> bytes:
    import orjson

    return orjson.dumps({"input": text})


class RawPoster:
    """The measuring client: raw HTTP/1.1 on one keep-alive socket per server (benchmarks/_common.py).
    httpx spends ~1 ms of its own per request here, several times what is being measured."""

    class Answer:
        def __init__(self, status: int, headers: dict, body: bytes):
            self.status_code, self.headers, self.content = status, headers, body
            self.text = body.decode(errors="replace")

    def __init__(self) -> None:
        self._clients: dict = {}

    def post(self, url: str, content: bytes, headers: dict) -> RawPoster.Answer:
        from benchmarks._common import BlockingClient

        base, _, path = url.partition("//")[2].partition("/")
        client = self._clients.get(base)
        if client is None:
            client = self._clients[base] = BlockingClient("http://" + base)
        extra = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        return RawPoster.Answer(*client.post("/" + path, content, extra))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


def timed(client, url: str, body: bytes, headers: dict, n: int, expect: str | None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(url, content=body, headers=headers)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
        if expect is not None and r.headers.get("x-cache") != expect:
            raise RuntimeError(f"{url} answered X-Cache: {r.headers.get('x-cache')}, expected {expect}")
        out.append(dt)
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# -------------------------------------------------------------------------------------- the run
def start_all(servers: dict, floor: FloorProcess) -> None:
    """Start every server at once (startup dominates a quick run); raise the first failure."""
    errors: list[BaseException] = []

    def start(obj) -> None:
        try:
            obj.__enter__()
        except BaseException as exc:  # noqa: BLE001 - reported below, after the others started
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in [*servers.values(), floor]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def start_redis_server(folder: Path):
    """``(process, port)`` of a private redis-server on loopback, or ``None`` when it is not installed."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    return None


def run(args: argparse.Namespace) -> Path:
    import httpx

    from framework.launch import ServerProcess

    model = args.model or ("echo" if args.quick else "minilm")
    n = args.n or (150 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="hydraserve-cache-bench-"))
    # tracing off: its cost is benchmarks/tracing.py's subject, and it would hide the cache's own
    common = [f"model={model}", "batching=none", "tracing=none"]
    servers = {
        "disk": ServerProcess([*common, "cache=disk", f"cache.directory={tmp / 'disk'}"]),
        "memory": ServerProcess([*common, "cache=memory"]),
        "semantic": ServerProcess([*common, "cache=semantic", f"cache.directory={tmp / 'semantic'}"]),
    }
    redis = start_redis_server(tmp)
    if redis is not None:  # Debian's redis-server, on a free loopback port, if installed
        redis_url = f"redis://127.0.0.1:{redis[1]}/0"
        servers["redis"] = ServerProcess([*common, "cache=redis", f"cache.url={redis_url}"])
        servers["redis-nofront"] = ServerProcess([*common, "cache=redis", f"cache.url={redis_url}",
                                                  "cache.prefix=nofront:", "cache.front_entries=0"])
    floor = FloorProcess()
    key = os.environ.get("HYDRASERVE_API_KEY")
    auth = {"X-API-Key": key} if key else {}
    json_headers = {"content-type": "application/json", **auth}
    scenarios = [
        Scenario("disk-cache hit", "disk", TEXT),
        Scenario("memory-cache hit", "memory", TEXT),
        Scenario("semantic hit (paraphrase)", "semantic", PARAPHRASE, expect="semantic-hit"),
        Scenario(f"miss: model={model} runs (Cache-Control: no-cache)", "disk", TEXT,
                 headers={"cache-control": "no-cache"}, expect="bypass"),
    ]
    if redis is not None:
        scenarios[2:2] = [Scenario("redis-cache hit (its in-process front)", "redis", TEXT),
                          Scenario("redis-cache hit (front off: a Redis round trip)", "redis-nofront", TEXT)]
    t_start = time.monotonic()
    print(f"starting the floor and {len(servers)} servers (model={model}) ...", flush=True)
    try:
        start_all(servers, floor)
        print(f"  up in {time.monotonic() - t_start:.0f} s", flush=True)
        with httpx.Client(timeout=60) as client:
            # Fill each cache with the answer to TEXT (the first request runs the model).
            answer = None
            for server in servers.values():
                r = client.post(server.url + "/predict", content=body_of(TEXT), headers=json_headers)
                r.raise_for_status()
                answer = answer or r.content
            client.put(floor.url + "/canned", content=answer)  # the floor answers with as many bytes
        poster = RawPoster()
        try:
            client = poster
            warm = max(20, n // 10)
            for sc in scenarios:
                url = servers[sc.server].url + "/predict"
                timed(client, url, body_of(sc.text), {**json_headers, **sc.headers}, warm, sc.expect)
            timed(client, floor.url + "/predict", body_of(TEXT), json_headers, warm, None)
            for r_i in range(rounds):
                for sc in scenarios:
                    url = servers[sc.server].url + "/predict"
                    sc.floor += timed(client, floor.url + "/predict", body_of(sc.text), json_headers, n, None)
                    sc.samples += timed(client, url, body_of(sc.text), {**json_headers, **sc.headers}, n,
                                        sc.expect)
                print(f"  round {r_i + 1}/{rounds} done", flush=True)
        finally:
            poster.close()
    finally:
        for server in servers.values():
            server.stop()
        floor.__exit__()
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(10)
    out = write_report(scenarios, args, model, n, rounds, len(answer or b""))
    print(out.read_text())
    print(f"total {time.monotonic() - t_start:.0f} s; written to {out}")
    return out


def write_report(scenarios: list[Scenario], args: argparse.Namespace, model: str, n: int, rounds: int,
                 body_bytes: int) -> Path:
    import torch

    floor_all = [x for sc in scenarios for x in sc.floor]
    lines = [
        "# Cache-hit latency vs a plain FastAPI echo",
        "",
        f"`python benchmarks/cache.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}. "
        f"{model}, tracing off, concurrency 1, a raw keep-alive socket client (benchmarks/_common.py), "
        f"{rounds} round(s) of {n} requests per scenario, each block interleaved with a block of the floor; "
        f"answer body {body_bytes} bytes (the floor returns as many).",
        "",
        "| scenario | X-Cache | p50 ms | p99 ms | p50 / floor p50 | p99 / floor p99 |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| floor: FastAPI + uvicorn echo | - | {statistics.median(floor_all) * 1e3:.3f} | "
        f"{pct(floor_all, 99) * 1e3:.3f} | 1.00 | 1.00 |",
    ]
    disk_ratio = disk_p50 = None
    redis_p50: dict[str, float] = {}
    for sc in scenarios:
        p50, p99 = statistics.median(sc.samples), pct(sc.samples, 99)
        f50, f99 = statistics.median(sc.floor), pct(sc.floor, 99)
        lines.append(f"| {sc.name} | {sc.expect} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {p50 / f50:.2f} | "
                     f"{p99 / f99:.2f} |")
        if sc.server == "disk" and sc.expect == "hit":
            disk_ratio = p50 / f50
            disk_p50 = p50
        if sc.server.startswith("redis"):
            redis_p50[sc.server] = p50
    verdict = "met" if disk_ratio is not None and disk_ratio <= GOAL_DISK_P50_RATIO else "NOT met"
    lines += [
        "",
        f"Goal: disk-cache hit p50 <= {GOAL_DISK_P50_RATIO}x the floor's p50: **{verdict}** "
        f"({disk_ratio or float('nan'):.2f}x).",
    ]
    if disk_p50 and redis_p50:
        ratios = ", ".join(f"{name} {p50 / disk_p50:.2f}x" for name, p50 in redis_p50.items())
        front = redis_p50.get("redis")
        verdict = "met" if front is not None and front / disk_p50 <= GOAL_REDIS_VS_DISK else "NOT met"
        lines += ["", f"Goal: a Redis hit p50 <= {GOAL_REDIS_VS_DISK}x a disk hit's: **{verdict}** ({ratios})."]
    lines += [
        "",
        "Ratios compare each scenario with the floor blocks measured between its own blocks. Absolute "
        "times depend on the machine; a quick run on a shared machine is a smoke test, not a result.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="model=echo, 1 round of 150 requests")
    parser.add_argument("--model", help="model option (default: minilm; echo with --quick)")
    parser.add_argument("--n", type=int, help="requests per block")
    parser.add_argument("--rounds", type=int, help="blocks per scenario")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.md"))
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return
    run(args)


if __name__ == "__main__":
    main()
