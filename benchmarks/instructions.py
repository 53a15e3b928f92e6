"""What a configuration costs the server per request, in CPU instructions: exact, not noisy.

    python benchmarks/instructions.py none=tracing=none file=tracing=file
    python benchmarks/instructions.py --concurrency 16 none=tracing=none ratio0=tracing=file,tracing.sample_ratio=0
    python benchmarks/instructions.py old=tracing=file,CODE:/tmp/old new=tracing=file   # two checkouts

Why: on a shared 2-core VM, requests/s and CPU seconds move by +-15-25% between identical runs,
more than the effects worth measuring (tracing's goal is 5%). Instructions do not: each server runs
under valgrind's callgrind, its counters are zeroed after a warm-up, ``--requests`` requests are
sent, and the instructions every API process and every worker executed meanwhile are divided by
the requests served. Two runs of one configuration agree to about 1%.

What it does not see: time in the kernel (socket and file system calls), cache misses, and the
load generator. So it ranks Python-level work exactly, and complements ``server_cpu.py`` (CPU time,
kernel included) rather than replacing it. Under valgrind a server runs ~50x slower: start-up takes
a few minutes per configuration, which run one after another (no interleaving is needed: nothing
here depends on the machine's load). Needs valgrind (apt-get install valgrind). Variants take the
same ``NAME=override,...,ENV:K=V,CODE:/path`` form as ``server_cpu.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
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


def instructions_since_zero(out_dir: Path, pid: int) -> int:
    """The instructions in ``pid``'s newest callgrind dump (counted since the last zeroing)."""
    dumps = sorted(out_dir.glob(f"cg.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for process {pid}")
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"{dumps[-1]}: no summary line")


def measure(name: str, overrides: list[str], env: dict, code_root: str | None, requests: int,
            concurrency: int, warmup: int, keep: Path | None = None) -> dict:
    if keep is not None:
        out_dir = keep / name
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir = Path(tempfile.mkdtemp(prefix=f"hydraserve-callgrind-{name}-"))
    wrapper = ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out_dir}/cg.%p",
               "--dump-instr=no", "--quiet"]
    server = ServerProcess([*COMMON, *overrides], env=env, code_root=code_root, wrapper=wrapper,
                           startup_timeout=1800)
    try:
        server.start()
        api, workers = server_pids(server)
        send_requests(server.url, warmup, concurrency, BODY)
        pids = [str(p) for p in api + workers]
        subprocess.run(["callgrind_control", "--zero", *pids], check=True, capture_output=True)
        started = time.monotonic()
        send_requests(server.url, requests, concurrency, BODY)
        seconds = time.monotonic() - started
        subprocess.run(["callgrind_control", "--dump", *pids], check=True, capture_output=True)
        time.sleep(1.0)  # the dump is written by the process itself, asynchronously
        api_ir = sum(instructions_since_zero(out_dir, p) for p in api)
        worker_ir = sum(instructions_since_zero(out_dir, p) for p in workers)
    finally:
        server.stop()
        if keep is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    return {"name": name, "overrides": overrides, "api_per_request": api_ir / requests,
            "worker_per_request": worker_ir / requests, "total_per_request": (api_ir + worker_ir) / requests,
            "seconds_under_valgrind": seconds, "api_pids": api, "worker_pids": workers, "dumps": str(keep and out_dir)}


def table(rows: list[dict]) -> str:
    base = rows[0]
    out = ["| variant | API process (instructions/request) | worker | total | total vs " + base["name"] + " |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['name']} | {r['api_per_request']:,.0f} | {r['worker_per_request']:,.0f} | "
                   f"{r['total_per_request']:,.0f} | {r['total_per_request'] / base['total_per_request']:.3f}x |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="NAME=override,override,... (the first is the baseline)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.md and .json")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="keep callgrind's dumps in DIR/NAME/ (cg.PID.N: the measured requests), to see "
                             "where the instructions went: callgrind_annotate DIR/NAME/cg.PID.1")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    rows = []
    for v in map(parse_variant, args.variants):
        rows.append(measure(v.name, v.overrides, v.env, v.code_root, args.requests, args.concurrency, args.warmup,
                            args.keep))
        r = rows[-1]
        kept = f" (dumps in {r['dumps']}: API {r['api_pids']}, workers {r['worker_pids']})" if args.keep else ""
        print(f"{v.name}: {r['total_per_request']:,.0f} instructions/request{kept}", flush=True)
    markdown = table(rows)
    print("\n" + markdown)
    if args.save:
        command = "python benchmarks/instructions.py " + " ".join(sys.argv[1:])
        header = (f"# Instructions per request (benchmarks/instructions.py)\n\nCommand: `{command}`  \n"
                  f"Machine: {machine()}; `{' '.join(COMMON)}`; body `{BODY.decode()}`; {args.requests} requests "
                  f"over {args.concurrency} connection(s) after {args.warmup} warm-up requests, counted by "
                  "valgrind's callgrind in every API process and worker (kernel time, cache misses and the "
                  "client are not counted).\n\n")
        write_results(args.save, header + markdown + "\n", {"machine": machine(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
