"""Which Python-level calls a configuration adds to a request, per server process: exact counts.

    python benchmarks/calls.py none=tracing=none file=tracing=file
    python benchmarks/calls.py --top 40 none=tracing=none file=tracing=file,CODE:/tmp/old

Why: on the request path of a Python server, cost follows the calls made (a Python function call
costs far more than the work most of them do). ``instructions.py`` says how much a configuration
costs; this says *what* it runs. Every server process gets a ``sys.setprofile`` hook (a
``sitecustomize`` on its ``PYTHONPATH``) that counts each call by function, Python and C alike;
after a warm-up the counts are zeroed (SIGUSR2), ``--requests`` requests are sent, and each
process writes its counts (SIGUSR1). The table lists calls per request in the API processes and
the workers, then the functions whose count per request differs most from the first variant.

The hook slows the server several times over: the counts are exact, times under it mean nothing.
Variants take the same ``NAME=override,...,ENV:K=V,CODE:/path`` form as ``instructions.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, parse_variant, send_requests, server_pids, write_results  # noqa: E402
from framework.launch import ServerProcess  # noqa: E402

COMMON = ["model=echo", "cache=none", "batching=none", "hardware=cpu", "server.log_level=info"]
BODY = b'{"input": "hello"}'

# Runs at start-up in every process of the server (sitecustomize), forked API processes included:
# they inherit the profile function of the thread that forked them.
HOOK = '''
import collections, json, os, signal, sys, threading
_out = os.environ["HYDRASERVE_CALLS_DIR"]
_counts = collections.Counter()

def _count(frame, event, arg):
    if event == "call":
        code = frame.f_code
        _counts[f"{code.co_filename.split('site-packages/')[-1]}:{code.co_firstlineno}:{code.co_name}"] += 1
    elif event == "c_call":
        _counts["C:" + getattr(arg, "__qualname__", repr(arg))] += 1

def _dump(*_):
    with open(os.path.join(_out, f"{os.getpid()}.json"), "w") as f:
        json.dump(dict(_counts), f)

signal.signal(signal.SIGUSR1, _dump)
signal.signal(signal.SIGUSR2, lambda *_: _counts.clear())
sys.setprofile(_count)
threading.setprofile(_count)
'''


def measure(name: str, overrides: list[str], env: dict, code_root: str | None, requests: int,
            warmup: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hydraserve-calls-") as tmp:
        hook_dir, out_dir = Path(tmp, "hook"), Path(tmp, "out")
        hook_dir.mkdir()
        out_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        path = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH") or os.environ.get("PYTHONPATH")) if p)
        server = ServerProcess([*COMMON, *overrides], code_root=code_root,
                               env={**env, "PYTHONPATH": path, "HYDRASERVE_CALLS_DIR": str(out_dir)})
        try:
            server.start()
            api, workers = server_pids(server)
            send_requests(server.url, warmup, 1, BODY)
            for pid in api + workers:
                os.kill(pid, signal.SIGUSR2)
            time.sleep(0.5)
            send_requests(server.url, requests, 1, BODY)
            time.sleep(0.5)
            for pid in api + workers:
                os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + 30
            while not all((out_dir / f"{p}.json").exists() for p in api + workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: not every server process wrote its counts")
                time.sleep(0.2)
            time.sleep(0.5)  # a process may still be writing its file
            counts = {p: json.loads((out_dir / f"{p}.json").read_text()) for p in api + workers}
        finally:
            server.stop()

    root = str(Path(code_root or ROOT)) + os.sep  # the framework's own files, named from the checkout

    def per_request(pids: list[int]) -> dict[str, float]:
        total: collections.Counter = collections.Counter()
        for p in pids:
            total.update(counts[p])
        return {k.replace(root, ""): v / requests for k, v in total.items()}

    return {"name": name, "overrides": overrides, "api": per_request(api), "worker": per_request(workers)}


def table(rows: list[dict], top: int) -> str:
    base = rows[0]
    out = [f"| variant | API process (calls/request) | worker | API vs {base['name']} | worker vs {base['name']} |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        api, worker = sum(r["api"].values()), sum(r["worker"].values())
        out.append(f"| {r['name']} | {api:.1f} | {worker:.1f} | {api - sum(base['api'].values()):+.1f} | "
                   f"{worker - sum(base['worker'].values()):+.1f} |")
    for r in rows[1:]:
        for role in ("api", "worker"):
            diff = {k: r[role].get(k, 0.0) - base[role].get(k, 0.0) for k in set(r[role]) | set(base[role])}
            changed = sorted((kv for kv in diff.items() if abs(kv[1]) >= 0.05), key=lambda kv: -abs(kv[1]))[:top]
            if not changed:
                continue
            out += ["", f"{r['name']} vs {base['name']}, {'API process' if role == 'api' else 'worker'}: calls per "
                    "request that differ (function: file:line:name, or C:name)", "",
                    "| calls/request | in " + base["name"] + " | function |", "| ---: | ---: | --- |"]
            out += [f"| {d:+.2f} | {base[role].get(k, 0.0):.2f} | `{k}` |" for k, d in changed]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="NAME=override,override,... (the first is the baseline)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--top", type=int, default=30, help="functions listed per comparison")
    parser.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.md and .json")
    args = parser.parse_args()
    rows = [measure(v.name, v.overrides, v.env, v.code_root, args.requests, args.warmup)
            for v in map(parse_variant, args.variants)]
    markdown = table(rows, args.top)
    print(markdown)
    if args.save:
        command = "python benchmarks/calls.py " + " ".join(sys.argv[1:])
        header = (f"# Calls per request (benchmarks/calls.py)\n\nCommand: `{command}`  \n"
                  f"Machine: {machine()}; `{' '.join(COMMON)}`; body `{BODY.decode()}`; {args.requests} requests "
                  f"over one connection after {args.warmup} warm-up requests, counted by a sys.setprofile hook "
                  "in every API process and worker.\n\n")
        write_results(args.save, header + markdown + "\n", {"machine": machine(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
