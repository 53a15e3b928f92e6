"""A generation request, its sampling parameters, the engine's budgets and what a step returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


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


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16  # sequences holding a KV slot at once (the decode batch's size)
    max_num_batched_tokens: int = 256  # tokens computed per step: decode rows + prefill chunk(s)
    max_model_len: int = 2048  # prompt + output tokens of one sequence (a KV slot's length)
    max_waiting: int = 256  # requests queued for a slot; beyond it add() raises QueueFullError

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.max_num_batched_tokens <= self.max_num_seqs:
            # Decode rows come first in a step's budget; with no room left a prompt would never prefill.
            out.append(("max_num_batched_tokens", f"must be > max_num_seqs ({self.max_num_seqs}) so a prefill "
                        f"chunk fits beside a full decode batch, got {self.max_num_batched_tokens}"))
        return out


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
