"""``hydraserve <command> [hydra overrides]``.

Commands: ``serve`` (start the server), ``validate`` (compose + validate, print every error),
``plugins`` (list plugins by kind and origin), ``cache stats|clear`` (the configured store),
``traces`` (waterfall of the slowest traced requests), ``bench`` (load tests and sweeps),
``deploy k8s`` (Kubernetes manifests for a validated config, framework/deploy.py).
``serve``, ``validate`` and ``bench`` are Hydra apps over the packaged ``conf/``: Hydra flags such
as ``--cfg job`` and ``-m`` work as usual.
"""

from __future__ import annotations

import logging
import sys

USAGE = """usage: hydraserve <command> [overrides...]

commands:
  serve     start the server            hydraserve serve model=minilm cache=disk server.port=8000
  validate  check a config, list errors  hydraserve validate quantization=int8_dynamic hardware=cpu
  plugins   list plugins by kind and where each comes from
  cache     stats | clear the configured response cache (hydraserve cache stats cache=disk)
  traces    waterfall of the slowest requests in a traces file (hydraserve traces outputs/ --png w.png)
  bench     open-loop load test / sweep   hydraserve bench -m quantization=none,int8_dynamic
  deploy    Kubernetes manifests          hydraserve deploy k8s model=echo cache=redis --out k8s/ --image IMAGE
"""

log = logging.getLogger("hydraserve")


def _fail_config(exc: Exception) -> None:
    print(str(exc), file=sys.stderr)
    sys.exit(2)


def _hydra_app(command: str, config_name: str, task, argv: list[str], own: list[str] | None = None) -> int:
    """Run ``task`` as a Hydra app; ``own`` overrides are the command's, ``argv`` the user's words
    (flags anywhere among overrides), checked before Hydra composes or runs anything."""
    import hydra

    from framework.cli_args import CommandLineError, hydra_argv
    from framework.config import conf_dir

    try:
        hydra_args = hydra_argv(command, argv, own)
    except CommandLineError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    main = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = hydra_args
    _failed_jobs.clear()
    try:
        main()
    finally:
        sys.argv = saved
    return 2 if _failed_jobs else 0


_failed_jobs: list[str] = []  # multirun `validate`: jobs whose config is not well-formed


def _serve_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from framework.composer import compose
    from framework.config import validate
    from framework.errors import ConfigError
    from framework.lifecycle import sigterm_as_interrupt

    try:
        resolved = validate(cfg)
    except ConfigError as exc:
        _fail_config(exc)
    output_dir = HydraConfig.get().runtime.output_dir
    server = compose(resolved, output_dir)
    s = resolved.server
    log.info("hydraserve: serving %s on http://%s:%d (output folder %s)", resolved.names(), s.host, s.port,
             output_dir)
    try:
        with sigterm_as_interrupt():  # `kill`, `docker stop`: the same graceful stop as Ctrl-C
            server.run(host=s.host, port=s.port, num_api_servers=s.num_api_servers, log_level=s.log_level,
                       generate_client_file=False, access_log=s.access_log)
    except RuntimeError as exc:  # e.g. a worker failed to start (quality gate, bad weights)
        print(f"hydraserve: {exc}", file=sys.stderr)
        sys.exit(3)


def _validate_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.config import validate
    from framework.errors import ConfigError

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            validate(cfg)
        except ConfigError as exc:
            _fail_config(exc)
        print("Config is well-formed")
        return
    # One line per job of a sweep; every job is checked, and the command fails if any is not well-formed.
    job = f"#{hydra_cfg.job.num} {' '.join(hydra_cfg.overrides.task)}"
    try:
        validate(cfg)
    except ConfigError as exc:
        _failed_jobs.append(job)
        print(f"{job}: {exc}", file=sys.stderr)
        return
    print(f"{job}: Config is well-formed")


def _validate(argv: list[str]) -> int:
    """``validate`` writes nothing: no run folder, no logs; a sweep's folder (``multirun.yaml``) is
    a temporary one."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hydraserve-validate-") as sweep_dir:
        return _hydra_app("validate", "serve", _validate_task, argv,
                          ["hydra.output_subdir=null", "hydra.run.dir=.", f"hydra.sweep.dir={sweep_dir}",
                           "hydra.sweep.subdir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"])


# The `bench` extra (pyproject.toml): import name -> package. `hydraserve serve` needs none of them.
BENCH_MODULES = {"matplotlib": "matplotlib", "hdrh": "hdrhistogram", "tqdm": "tqdm", "httpx": "httpx"}
BENCH_INSTALL = "pip install 'hydraserve[bench]'"


def _bench_missing() -> list[str]:
    """The bench extra's packages that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for module, package in BENCH_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def _bench_hint(missing: list[str]) -> str:
    return (f"hydraserve bench: the load tester needs the bench extra ({', '.join(missing)} not installed); "
            f"install it with: {BENCH_INSTALL}")


def _bench(argv: list[str]) -> int:
    missing = _bench_missing()
    if missing:
        print(_bench_hint(missing), file=sys.stderr)
        return 2
    return _hydra_app("bench", "bench", _bench_task, argv)


def _bench_task(cfg) -> None:
    try:
        from framework.bench.app import run
    except ImportError as exc:  # a bench package that find_spec saw but that does not import
        if (exc.name or "").partition(".")[0] not in BENCH_MODULES:
            raise
        print(_bench_hint([BENCH_MODULES[exc.name.partition(".")[0]]]), file=sys.stderr)
        sys.exit(2)

    code = run(cfg)
    if code:
        sys.exit(code)


def _plugins(argv: list[str]) -> int:
    from framework import registry
    from framework.plugin import KINDS

    for kind in KINDS:
        print(f"{kind}:")
        for src in registry.sources(kind):
            print(f"  {src.name:<20} {src.origin}")
    for clash in registry.clashes():
        print(f"warning: {clash}", file=sys.stderr)
    return 0


def _cache(argv: list[str]) -> int:
    from framework.cache_admin import cache_clear, cache_stats
    from framework.config import compose, validate
    from framework.errors import ConfigError

    if not argv or argv[0] not in ("stats", "clear"):
        print("usage: hydraserve cache stats|clear [overrides...]", file=sys.stderr)
        return 2
    try:
        resolved = validate(compose(argv[1:]))
    except ConfigError as exc:
        _fail_config(exc)
    if argv[0] == "stats":
        import json

        print(json.dumps(cache_stats(resolved.cache), indent=2, default=str))
    else:
        print(f"removed {cache_clear(resolved.cache)} entries")
    return 0


DEPLOY_USAGE = "usage: hydraserve deploy k8s [overrides...] [--out DIR] [--image IMAGE] [--replicas N] ..."


def _deploy(argv: list[str]) -> int:
    """``deploy k8s``: every problem (config, secrets, options) is reported before anything is written."""
    import argparse
    from pathlib import Path

    from framework.cli_args import CommandLineError
    from framework.deploy import DeployOptions, render_overrides, to_yaml, write
    from framework.errors import ConfigError

    if not argv or argv[0] != "k8s":
        print(DEPLOY_USAGE, file=sys.stderr)
        return 2
    d = DeployOptions()
    parser = argparse.ArgumentParser(prog="hydraserve deploy k8s", allow_abbrev=False,
                                     usage=DEPLOY_USAGE.removeprefix("usage: "))
    parser.add_argument("--out", type=Path, help="write one file per manifest there (default: stdout)")
    parser.add_argument("--image", default=d.image)
    parser.add_argument("--name", default=d.name, help="name of the Deployment, Service, ConfigMap...")
    parser.add_argument("--namespace", default=d.namespace)
    parser.add_argument("--replicas", type=int, default=d.replicas, help="replicas, and the autoscaler's minimum")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaler's maximum (default 10)")
    parser.add_argument("--queue-target", type=int, default=d.queue_target,
                        help="waiting requests per pod the autoscaler aims for")
    parser.add_argument("--no-autoscale", action="store_true", help="no KEDA ScaledObject")
    parser.add_argument("--prometheus-url", default=d.prometheus_url)
    parser.add_argument("--cpu", default=d.cpu)
    parser.add_argument("--memory", default=d.memory)
    parser.add_argument("--require-api-key", action="store_true",
                        help="the pod does not start without the API key in the Secret")
    known, overrides = parser.parse_known_args(argv[1:])
    opts = DeployOptions(
        name=known.name, namespace=known.namespace, image=known.image, replicas=known.replicas,
        max_replicas=known.max_replicas if known.max_replicas is not None else max(d.max_replicas, known.replicas),
        queue_target=known.queue_target, autoscale=not known.no_autoscale, prometheus_url=known.prometheus_url,
        cpu=known.cpu, memory=known.memory, require_api_key=known.require_api_key)
    try:
        rendered = render_overrides(overrides, opts)
    except CommandLineError as exc:
        print(str(exc).replace("hydraserve serve:", "hydraserve deploy k8s:"), file=sys.stderr)
        return 2
    except ConfigError as exc:
        _fail_config(exc)
    for note in rendered.notes:
        print(f"note: {note}", file=sys.stderr)
    if known.out is None:
        sys.stdout.write(to_yaml(rendered.documents))
    else:
        for path in write(rendered.documents, known.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _hydra_app("serve", "serve", _serve_task, rest)
    if command == "validate":
        return _validate(rest)
    if command == "bench":
        return _bench(rest)
    if command == "plugins":
        return _plugins(rest)
    if command == "cache":
        return _cache(rest)
    if command == "deploy":
        return _deploy(rest)
    if command == "traces":
        from framework.traces_view import main as traces_main

        return traces_main(rest)
    print(f"hydraserve: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
