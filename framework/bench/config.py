"""The ``bench`` node of ``conf/bench.yaml``, validated like every other group: all problems at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from framework.bench.baselines import BASELINES
from framework.bench.http_client import split_url
from framework.bench.load import ARRIVALS, Stage
from framework.errors import ConfigError, ConfigProblem

CLIENTS = ("raw", "httpx")
WORKLOAD_KINDS = ("text", "vector", "chat", "jsonl")


@dataclass
class WorkloadSettings:
    kind: str = "text"
    path: str | None = None
    requests: int | None = None
    repeat_ratio: float = 0.0
    paraphrase_ratio: float = 0.0
    items_per_request: int = 1
    dim: int = 8
    seed: int = 0
    # kind=chat: prompt length in words (~tokens) and max_tokens per request, each a distribution
    # {dist: fixed|uniform|normal, mean, min, max, std}; model null asks the server's GET /v1/models.
    prompt_tokens: dict = field(default_factory=lambda: {"dist": "uniform", "mean": None, "std": None,
                                                                 "min": 32, "max": 128})
    output_tokens: dict = field(default_factory=lambda: {"dist": "fixed", "mean": 64, "std": None,
                                                                 "min": None, "max": None})
    model: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        from framework.bench.workload import dist_problems

        out = []
        if self.kind == "chat":
            out += dist_problems(self.prompt_tokens, "prompt_tokens")
            out += dist_problems(self.output_tokens, "output_tokens")
        if self.temperature < 0:
            out.append(("temperature", f"must be >= 0, got {self.temperature}"))
        if self.kind not in WORKLOAD_KINDS:
            out.append(("kind", f"must be one of {', '.join(WORKLOAD_KINDS)}, got {self.kind!r}"))
        if self.kind == "jsonl" and not self.path:
            out.append(("path", "required when bench.workload.kind=jsonl (a file with one request body per line)"))
        for name in ("repeat_ratio", "paraphrase_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append((name, f"must be within [0, 1], got {getattr(self, name)}"))
        if self.repeat_ratio + self.paraphrase_ratio >= 1.0:
            out.append(("repeat_ratio", "repeat_ratio + paraphrase_ratio must be < 1 (some requests must be new), "
                        f"got {self.repeat_ratio} + {self.paraphrase_ratio}"))
        if self.requests is not None and self.requests < 1:
            out.append(("requests", f"must be >= 1 or null, got {self.requests}"))
        for name in ("items_per_request", "dim"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return out


@dataclass
class SloSettings:
    """Streamed chat's objective (``framework.bench.chat.meets_slo``): TTFT and token pace, in ms."""

    ttft_ms: float = 1000.0
    itl_ms: float = 100.0
    itl_metric: str = "tpot"  # tpot (mean time per output token after the first) | max_itl (largest gap)

    def problems(self) -> list[tuple[str, str]]:
        out = [(name, f"must be > 0, got {getattr(self, name)}") for name in ("ttft_ms", "itl_ms")
               if getattr(self, name) <= 0]
        if self.itl_metric not in ("tpot", "max_itl"):
            out.append(("itl_metric", f"must be tpot or max_itl, got {self.itl_metric!r}"))
        return out


@dataclass
class BenchSettings:
    url: str | None = None
    path: str = "/predict"
    arrival: str = "constant"
    rates: list[float] = field(default_factory=lambda: [10.0])
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: int = 64
    timeout_s: float = 10.0
    drain_s: float = 10.0
    slo_ms: float = 100.0
    client: str = "raw"
    max_requests: int = 200_000
    seed: int = 0
    progress: bool = True
    startup_timeout_s: float = 300.0
    headers: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    recommend: bool = False
    cold_cache: bool = True
    min_quality: float | None = None
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    slo: SloSettings = field(default_factory=SloSettings)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.url is not None:
            try:
                split_url(self.url)
            except ValueError as exc:
                out.append(("url", str(exc)))
        if not self.path.startswith("/"):
            out.append(("path", f"must start with '/', got {self.path!r}"))
        if self.arrival not in ARRIVALS:
            out.append(("arrival", f"must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}"))
        if not self.rates or any(r <= 0 for r in self.rates):
            out.append(("rates", f"must be a non-empty list of rates > 0 (requests/s), got {self.rates}"))
        if self.client not in CLIENTS:
            out.append(("client", f"must be one of {', '.join(CLIENTS)}, got {self.client!r}"))
        for name in ("duration_s", "timeout_s", "slo_ms", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("warmup_s", "drain_s"):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if not 1 <= self.connections <= 10_000:
            out.append(("connections", f"must be in 1..10000, got {self.connections}"))
        if self.max_requests < 1:
            out.append(("max_requests", f"must be >= 1, got {self.max_requests}"))
        for name in self.baselines:
            if name not in BASELINES:
                out.append(("baselines", f"unknown baseline {name!r}; available: {', '.join(BASELINES)}"))
        if self.min_quality is not None and not -1.0 <= self.min_quality <= 1.0:
            out.append(("min_quality", f"must be a cosine within [-1, 1] or null, got {self.min_quality}"))
        if self.workload.kind == "chat" and self.baselines:
            out.append(("baselines", "the baselines do not stream chat completions: use baselines=[] with "
                        f"workload.kind=chat, got {self.baselines}"))
        out += [(f"workload.{k}", m) for k, m in self.workload.problems()]
        return out

    @property
    def streaming_kind(self) -> bool:
        """Generated chat: the requests are streamed and read as SSE."""
        return self.workload.kind == "chat"

    def stages(self) -> list[Stage]:
        return [Stage(float(r), float(self.duration_s), self.arrival) for r in self.rates]


def bench_settings(cfg: DictConfig | dict) -> BenchSettings:
    """Validate ``cfg.bench`` (the whole config or just the node); ``ConfigError`` lists every problem."""
    from framework.config import _merge_into_dataclass

    node = cfg.get("bench", cfg) if isinstance(cfg, (dict, DictConfig)) else cfg
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    if isinstance(raw.get("rates"), (int, float)):  # bench.rates=50 means one rate
        raw["rates"] = [raw["rates"]]
    problems: list[ConfigProblem] = []
    workload = raw.pop("workload", None) or {}
    slo_node = raw.pop("slo", None) or {}
    settings = _merge_into_dataclass(BenchSettings, raw, "bench", problems)
    wl = _merge_into_dataclass(WorkloadSettings, dict(workload), "bench.workload", problems)
    slo = _merge_into_dataclass(SloSettings, dict(slo_node), "bench.slo", problems)
    if settings is not None and wl is not None and slo is not None:
        settings.workload = wl
        settings.slo = slo
        problems += [ConfigProblem(f"bench.{k}", m) for k, m in settings.problems()
                     if not k.startswith("workload.")]
    if problems:
        raise ConfigError(_dedupe(problems))
    return settings


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen, out = set(), []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            out.append(p)
    return out
