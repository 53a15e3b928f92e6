"""A generation request, its sampling parameters, the engine's budgets and what a step returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from framework.generation.speculative import NgramConfig

FinishReason = Literal["stop", "length", "cancelled"]
SPECULATIVE_METHODS = ("off", "ngram")


class RequestTooLongError(ValueError):
    """The request can never fit the engine's budgets (prompt + max_tokens > max_model_len): a client error."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should answer 503 + Retry-After."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax), as OpenAI's temperature=0 is meant
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # a per-request torch.Generator, so a seeded request is reproducible in any batch

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0.0 <= self.temperature <= 2.0:
            out.append(("temperature", f"must be in [0, 2], got {self.temperature}"))
        if not 0.0 < self.top_p <= 1.0:
            out.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # never emitted; matched across token boundaries
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the engine's EOS ids
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


def check_request(request: GenerationRequest, max_model_len: int) -> None:
    """Raise ``ValueError`` for bad parameters, ``RequestTooLongError`` if it can never fit: what every
    engine checks in ``add`` (the native one and a model's own, e.g. vLLM's adapter)."""
    problems = [f"{k}: {v}" for k, v in request.sampling.problems()]
    if not request.prompt_ids:
        problems.append("prompt_ids: the prompt is empty")
    if request.max_tokens < 1:
        problems.append(f"max_tokens: must be >= 1, got {request.max_tokens}")
    if problems:
        raise ValueError("; ".join(problems))
    need = len(request.prompt_ids) + request.max_tokens
    if need > max_model_len:
        raise RequestTooLongError(
            f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) = {need} "
            f"exceeds max_model_len={max_model_len}; shorten the prompt or lower max_tokens")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16  # sequences holding a KV slot at once (the decode batch's size)
    max_num_batched_tokens: int = 256  # tokens computed per step: decode rows + prefill chunk(s)
    max_model_len: int = 2048  # prompt + output tokens of one sequence (a KV slot's length)
    max_waiting: int = 256  # requests queued for a slot; beyond it add() raises QueueFullError
    # Prefix cache (framework/generation/prefix_cache.py): MiB of KV kept for reuse; 0 = off.
    prefix_cache_mb: int = 0
    prefix_block_size: int = 16  # tokens per cached block: a hit covers whole blocks of a prompt
    # Speculative decoding (framework/generation/speculative.py): "off" or "ngram" (prompt lookup).
    speculative: str = "off"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # Speculate only while at most this many sequences decode: under load a step is already full of
    # rows sharing one weight read, and verifying drafts adds compute without saving a read.
    speculative_max_batch: int = 4

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting",
                     "prefix_block_size", "speculative_max_batch"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.prefix_cache_mb < 0:
            out.append(("prefix_cache_mb", f"must be >= 0 (0 turns the prefix cache off), got {self.prefix_cache_mb}"))
        if self.speculative not in SPECULATIVE_METHODS:
            out.append(("speculative", f"must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}"))
        out.extend(self.ngram().problems())  # checked while off too: turning it on must not fail later
        if self.max_num_batched_tokens <= self.max_num_seqs:
            # Decode rows come first in a step's budget; with no room left a prompt would never prefill.
            out.append(("max_num_batched_tokens", f"must be > max_num_seqs ({self.max_num_seqs}) so a prefill "
                        f"chunk fits beside a full decode batch, got {self.max_num_batched_tokens}"))
        return out

    def ngram(self) -> NgramConfig:
        return NgramConfig(self.num_speculative_tokens, self.prompt_lookup_max, self.prompt_lookup_min)


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one sequence: text to send now, and whether it is over."""

    seq_id: int
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    new_token_ids: tuple[int, ...] = ()
