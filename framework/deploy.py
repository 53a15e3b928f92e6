"""``hydraserve deploy k8s [overrides]``: Kubernetes manifests for the composed, validated config.

What is rendered (``render``), for a platform engineer to ``kubectl apply``:

* **ConfigMap** ``<name>-config``: ``config.yaml``, the config the pod composes (Hydra's composition
  with interpolations such as ``${oc.env:...}`` left as written, so nothing from this machine's
  environment lands in it), and ``serve-args.yaml``, the exact ``hydraserve serve`` overrides.
* **Deployment** ``<name>``: ``command: [hydraserve]``, ``args: [serve, <overrides>...]`` (the
  image's ENTRYPOINT is the same ``hydraserve``). The overrides *are* the config: ``hydraserve``
  refuses Hydra's ``--config-path/--config-name/--config-dir`` (framework/cli_args.py), so a mounted
  YAML could not be read as the primary config; the args compose, in the pod, to exactly the
  ConfigMap's ``config.yaml`` (the tests check it). The ConfigMap is mounted read-only at
  ``/etc/hydraserve`` for people and tools, and its hash is a pod annotation, so a changed config
  rolls the pods. Probes: readiness ``GET /health`` (503 until every worker is ready), a startup
  probe sized from ``server.startup_timeout_s``, liveness a TCP connect (a busy or restarting worker
  must not get the pod killed). The API key comes from a Secret into ``server.api_key_env``.
* **Service** ``<name>`` (ClusterIP, port 80 -> the container's ``http`` port).
* **ScaledObject** (KEDA) ``<name>``: Prometheus triggers on the queue depth per pod
  (``hydraserve_queue_depth``; for chat models also ``hydraserve_num_requests_waiting``).
* With ``cache=redis`` and no reachable URL of its own (unset or localhost): a Redis Deployment and
  Service ``<name>-redis``, and ``cache.url`` pointing at it.

Secrets are **refused**, not moved: a literal secret in the config (a value under a secret-naming key
such as ``tracing.headers``, a password in a URL) would be written in plain text into the ConfigMap
and the Deployment's args, which end up in git and in ``kubectl get -o yaml``. Writing it into a
rendered Secret instead would print it just the same. The fix the error names: reference an
environment variable (``tracing.headers={authorization:'Bearer ${oc.env:OTLP_TOKEN}'}``,
``cache.url='redis://:${oc.env:REDIS_PASSWORD}@redis:6379/0'``); each such variable becomes an env
entry from the Secret ``<name>-secrets`` (created by the operator, never rendered here).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from framework.errors import ConfigError, ConfigProblem
from framework.security import names_secret
from framework.settings import ServerConfig

CONFIG_MOUNT = "/etc/hydraserve"
HOME = "/home/hydraserve"  # the image's user's HOME and WORKDIR (Dockerfile): outputs/, caches
UID = 10001  # the image's user (Dockerfile)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
ENV_REF = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,[^}]*)?\}")
URL_PASSWORD = re.compile(r"://[^/@:\s]*:([^/@\s]+)@")
# What may stand next to a referenced secret in a value ("Bearer ${oc.env:TOKEN}").
SECRET_PREFIX = re.compile(r"\s*(bearer|basic|token)?\s*", re.IGNORECASE)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")
REDIS_PORT = 6379


@dataclass
class DeployOptions:
    name: str = "hydraserve"
    namespace: str = "default"
    image: str = "hydraserve:0.1.0"
    replicas: int = 1  # the Deployment's replicas, and the autoscaler's minimum
    max_replicas: int = 10
    queue_target: int = 8  # requests waiting per pod the autoscaler aims for
    autoscale: bool = True
    prometheus_url: str = "http://prometheus-server.monitoring.svc"
    cpu: str = "2"
    memory: str = "4Gi"
    require_api_key: bool = False  # the pod does not start without the key in the Secret
    redis_image: str = "redis:7.4-alpine"
    redis_memory_mb: int = 512

    @property
    def secret_name(self) -> str:
        return f"{self.name}-secrets"

    @property
    def redis_name(self) -> str:
        return f"{self.name}-redis"

    def problems(self) -> list[str]:
        out = []
        if not DNS_LABEL.fullmatch(self.name) or len(self.name) > 47:
            out.append(f"--name: must be a DNS label (lowercase letters, digits, '-'), at most 47 characters "
                       f"(room for '-secrets'), got '{self.name}'")
        if not DNS_LABEL.fullmatch(self.namespace) or len(self.namespace) > 63:
            out.append(f"--namespace: must be a DNS label, got '{self.namespace}'")
        if self.replicas < 1:
            out.append(f"--replicas: must be >= 1 (the pods that stay up), got {self.replicas}")
        if self.max_replicas < self.replicas:
            out.append(f"--max-replicas: must be >= --replicas ({self.replicas}), got {self.max_replicas}")
        if self.queue_target < 1:
            out.append(f"--queue-target: must be >= 1, got {self.queue_target}")
        if not self.image:
            out.append("--image: must name an image")
        return out


@dataclass
class Rendered:
    documents: list[dict]
    args: list[str]  # hydraserve serve <args>
    notes: list[str] = field(default_factory=list)  # for stderr: what the operator still has to do


# ------------------------------------------------------------------------------------ overrides


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").lstrip("/")


def pod_overrides(user: list[str], raw: dict, opts: DeployOptions) -> tuple[list[str], list[str], bool]:
    """``(overrides, notes, with_redis)``: the user's overrides plus what a pod needs (listen on every
    interface; no ever-growing traces file unless tracing was chosen; the in-cluster Redis)."""
    notes: list[str] = []
    keys = [_key(o) for o in user]
    out = [o for o in user if _key(o) != "server.host"]
    host = (raw.get("server") or {}).get("host")
    if host in ("0.0.0.0", "::") and "server.host" in keys:
        out = list(user)
    else:
        out.append("server.host=0.0.0.0")
    if "tracing" not in keys and "experiment" not in keys:
        out.append("tracing=none")
        notes.append("tracing=none added: the default tracing=file grows traces.jsonl in the pod without bound; "
                     "choose tracing=otlp (or tracing=file) to keep spans")
    cache = raw.get("cache") or {}
    with_redis = False
    if cache.get("name") == "redis":
        url = cache.get("url")
        host = urlsplit(str(url)).hostname if url else ""
        if not url or (host or "") in LOCAL_HOSTS:
            with_redis = True
            out = [o for o in out if _key(o) != "cache.url"]
            out.append(f"cache.url=redis://{opts.redis_name}:{REDIS_PORT}/0")
    return out, notes, with_redis


# -------------------------------------------------------------------------------------- secrets


def secret_problems(config: Any, path: str = "", hide: bool = False) -> tuple[list[ConfigProblem], list[str]]:
    """``(problems, env names)`` of a composed config with its interpolations unresolved: a literal
    secret is a problem; a secret given as ``${oc.env:NAME}`` names a variable for the Secret."""
    problems: list[ConfigProblem] = []
    env: list[str] = []
    if isinstance(config, dict):
        for k, v in config.items():
            p, e = secret_problems(v, f"{path}.{k}" if path else str(k), hide or names_secret(k))
            problems += p
            env += e
        return problems, env
    if isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            p, e = secret_problems(v, f"{path}[{i}]", hide)
            problems += p
            env += e
        return problems, env
    if config is None:
        return problems, env
    text = str(config)
    fix = ("a secret here would be written in plain text into the ConfigMap and the Deployment's args; "
           "reference an environment variable instead")
    if hide and isinstance(config, str):  # numbers and flags are no secrets (server.header_timeout_s)
        names = ENV_REF.findall(text)
        if names and SECRET_PREFIX.fullmatch(ENV_REF.sub("", text)):
            env += names
        else:
            problems.append(ConfigProblem(path, f"{fix} ({path}='${{oc.env:NAME}}', or 'Bearer ${{oc.env:NAME}}') "
                                          f"and put the value under the key NAME of the Secret"))
    elif isinstance(config, str):
        for match in URL_PASSWORD.finditer(text):
            names = ENV_REF.findall(match.group(1))
            if names and ENV_REF.sub("", match.group(1)) == "":
                env += names
            else:
                problems.append(ConfigProblem(path, f"the URL holds a password: {fix} "
                                              f"(scheme://user:${{oc.env:NAME}}@host) and put the value under "
                                              f"the key NAME of the Secret"))
    return problems, env


@contextmanager
def _placeholder_env(names: list[str]):
    """Validation resolves ``${oc.env:NAME}``; the pod gets NAME from the Secret, this machine may not
    have it: a placeholder stands in while validating (and is never rendered: the config is dumped
    unresolved)."""
    added = [n for n in dict.fromkeys(names) if n not in os.environ]
    for n in added:
        os.environ[n] = "from-the-secret"
    try:
        yield
    finally:
        for n in added:
            os.environ.pop(n, None)


# --------------------------------------------------------------------------------------- render


def _labels(opts: DeployOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "hydraserve", "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/component": component}


def _meta(name: str, opts: DeployOptions, component: str, extra: dict | None = None) -> dict:
    labels = {**_labels(opts, component), "app.kubernetes.io/managed-by": "hydraserve-deploy", **(extra or {})}
    return {"name": name, "namespace": opts.namespace, "labels": labels}


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=4096)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def gpu_count(raw: dict) -> int:
    hw = raw.get("hardware") or {}
    if hw.get("name") != "cuda":
        return 0
    devices = hw.get("devices")
    return int(devices) if isinstance(devices, int) and devices > 0 else 1


def render(config: dict, args: list[str], opts: DeployOptions, *, server: ServerConfig | None = None,
           chat: bool | None = None, secret_env: list[str] | None = None, with_redis: bool = False) -> list[dict]:
    """The manifests for ``hydraserve serve <args>`` whose composed config is ``config`` (plain data,
    interpolations unresolved). ``server``: the validated server settings (default: read from
    ``config``); ``chat``: a generative model (default: batching is continuous)."""
    if server is None:
        known = {k: v for k, v in (config.get("server") or {}).items() if k in ServerConfig.__dataclass_fields__}
        server = ServerConfig(**known)
    if chat is None:
        chat = (config.get("batching") or {}).get("name") == "continuous"
    names = {k: (config.get(k) or {}).get("name", "") for k in ("model", "cache", "hardware")}
    config_yaml = _dump(config)
    args_yaml = _dump(["serve", *args])
    digest = hashlib.sha256((config_yaml + args_yaml + opts.image).encode()).hexdigest()
    extra = {"hydraserve.io/model": str(names["model"])[:63]}
    docs: list[dict] = []

    docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": _meta(f"{opts.name}-config", opts, "server", extra),
                 "data": {"config.yaml": config_yaml, "serve-args.yaml": args_yaml}})

    env: list[dict] = [{"name": server.api_key_env, "valueFrom": {"secretKeyRef": {
        "name": opts.secret_name, "key": server.api_key_env, "optional": not opts.require_api_key}}}]
    for name in dict.fromkeys(secret_env or []):
        if name != server.api_key_env:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": name}}})

    gpus = gpu_count(config)
    resources: dict = {"requests": {"cpu": opts.cpu, "memory": opts.memory}, "limits": {"memory": opts.memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
    period = 10
    startup_failures = max(3, math.ceil((server.startup_timeout_s + 60) / period))  # + imports, model load
    grace = math.ceil(server.timeout_ms / 1000) + 15  # in-flight requests finish after SIGTERM
    container = {
        "name": "hydraserve", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "command": ["hydraserve"], "args": ["serve", *args],
        "ports": [{"name": "http", "containerPort": server.port, "protocol": "TCP"}],
        "env": env,
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
                         "timeoutSeconds": 2, "failureThreshold": startup_failures},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 20, "timeoutSeconds": 5,
                          "failureThreshold": 6},
        # Endpoints drop the pod before the server stops taking connections.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "home", "mountPath": HOME}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{opts.name}-config"}},
                    {"name": "home", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}},
                    # worker processes pass tensors through shared memory; the runtime's default is 64 MiB
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
    }
    if gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    selector = _labels(opts, "server")
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(opts.name, opts, "server", extra),
                 "spec": {"replicas": opts.replicas, "selector": {"matchLabels": selector},
                          # a new pod loads its model before an old one goes: capacity never drops
                          "strategy": {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                          "template": {"metadata": {"labels": {**selector, **extra}, "annotations": {
                              "hydraserve.io/config-sha256": digest, "prometheus.io/scrape": "true",
                              "prometheus.io/port": str(server.port), "prometheus.io/path": "/metrics"}},
                              "spec": pod_spec}}})

    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(opts.name, opts, "server"),
                 "spec": {"type": "ClusterIP", "selector": selector,
                          "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})

    if opts.autoscale:
        docs.append(scaled_object(opts, chat))
    if with_redis:
        docs += redis_manifests(opts)
    return docs


def pod_selector(opts: DeployOptions) -> str:
    # The server's pods only (<name>-<replicaset hash>-<suffix>), not <name>-redis-...: =~ is anchored.
    return f'namespace="{opts.namespace}",pod=~"{opts.name}-[a-z0-9]+-[a-z0-9]+"'


def scaled_object(opts: DeployOptions, chat: bool) -> dict:
    metrics = ["hydraserve_queue_depth", *(["hydraserve_num_requests_waiting"] if chat else [])]
    triggers = [{"type": "prometheus", "name": m.removeprefix("hydraserve_").replace("_", "-"),
                 "metricType": "AverageValue",  # the sum over pods / replicas is held at the threshold
                 "metadata": {"serverAddress": opts.prometheus_url,
                              "query": f"sum({m}{{{pod_selector(opts)}}}) or vector(0)",
                              "threshold": str(opts.queue_target)}} for m in metrics]
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(opts.name, opts, "server"),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
                     "minReplicaCount": opts.replicas, "maxReplicaCount": opts.max_replicas,
                     "pollingInterval": 15, "cooldownPeriod": 300,
                     "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                         "scaleDown": {"stabilizationWindowSeconds": 300}}}},
                     "triggers": triggers}}


def redis_manifests(opts: DeployOptions) -> list[dict]:
    """One Redis for the response cache, shared by every server pod; a cache: no persistence, LRU."""
    labels = _labels(opts, "redis")
    memory = f"{opts.redis_memory_mb + 256}Mi"
    container = {
        "name": "redis", "image": opts.redis_image, "imagePullPolicy": "IfNotPresent",
        "args": ["--save", "", "--appendonly", "no", "--maxmemory", f"{opts.redis_memory_mb}mb",
                 "--maxmemory-policy", "allkeys-lru"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 20, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": memory}, "limits": {"memory": memory}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(opts.redis_name, opts, "redis"),
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "automountServiceAccountToken": False,
                      "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999,
                                          "fsGroup": 999, "seccompProfile": {"type": "RuntimeDefault"}},
                      "containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(opts.redis_name, opts, "redis"),
         "spec": {"type": "ClusterIP", "selector": labels,
                  "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]}},
    ]


# ------------------------------------------------------------------------------ from overrides


def _compose_problem(exc: Exception) -> ConfigError:
    return ConfigError([ConfigProblem("(overrides)", str(exc).strip().splitlines()[0])])


def render_overrides(overrides: list[str], opts: DeployOptions) -> Rendered:
    """Compose and validate ``overrides`` as ``hydraserve serve`` would in the pod, then render.
    Raises ``CommandLineError`` (refused arguments) or ``ConfigError`` (every problem at once)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from framework.cli_args import hydra_argv
    from framework.config import compose, validate

    hydra_argv("serve", overrides)  # the checks `serve` makes; flags are refused here too
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError([ConfigProblem("(overrides)", f"deploy takes overrides only, not Hydra flags: "
                                         f"{' '.join(flags)}")])
    try:
        first = OmegaConf.to_container(compose(overrides), resolve=False)
        args, notes, with_redis = pod_overrides(overrides, first, opts)
        config = OmegaConf.to_container(compose(args), resolve=False)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _compose_problem(exc) from exc
    problems, secret_env = secret_problems(config)
    problems += [ConfigProblem("(deploy)", p) for p in opts.problems()]
    resolved = None
    with _placeholder_env(secret_env):
        try:
            resolved = validate(compose(args))
        except ConfigError as exc:
            problems = [*exc.problems, *problems]
    if problems:
        raise ConfigError(problems)
    server = resolved.server
    if server.api_key_env and "/metrics" not in server.public_paths:
        notes.append(f"/metrics needs the API key once {server.api_key_env} is set: give Prometheus the key, or "
                     f"add server.public_paths=[/health,/metrics]")
    model_path = (config.get("model") or {}).get("path")
    if model_path:
        notes.append(f"model.path={model_path} was checked on this machine: the image (or a volume you add) "
                     "must hold it at the same path")
    if gpu_count(config) and "cuda" not in opts.image:
        notes.append(f"hardware=cuda: build the image with the CUDA base (Dockerfile BASE_IMAGE, TORCH_INDEX); "
                     f"'{opts.image}' does not look like one")
    keys = " ".join(f"--from-literal={k}=..." for k in dict.fromkeys([server.api_key_env, *secret_env]))
    notes.append(f"create the Secret first: kubectl -n {opts.namespace} create secret generic {opts.secret_name} "
                 f"{keys}")
    docs = render(config, args, opts, server=server, chat=resolved.model.task == "chat",
                  secret_env=secret_env, with_redis=with_redis)
    return Rendered(docs, args, notes)


def to_yaml(docs: list[dict]) -> str:
    return "---\n".join(_dump(d) for d in docs)


def file_name(doc: dict) -> str:
    return f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"


def write(docs: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        path = out / file_name(doc)
        path.write_text(_dump(doc))
        paths.append(path)
    return paths
