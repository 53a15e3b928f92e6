"""One request's life inside the engine: where its prompt is, what it produced, why it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from framework.generation.request import FinishReason, GenerationRequest
from framework.generation.sampling import new_generator
from framework.generation.text import IncrementalDetokenizer, StopMatcher


class Status(enum.Enum):
    WAITING = "waiting"  # queued for a KV slot
    PREFILL = "prefill"  # holds a slot; part of its prompt is not in the KV cache yet
    DECODE = "decode"  # prompt in the cache; one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0  # positions whose KV is in the slot
    prefix_hit_tokens: int = 0  # of them, copied from the prefix cache at admission
    computed_tokens: int = 0  # tokens this sequence ran through the model (a cancelled one stops growing)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when it got a KV slot (the end of its wait in the queue)
    first_token_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def create(cls, seq_id: int, request: GenerationRequest, tokenizer: Any) -> Sequence:
        return cls(seq_id, request, IncrementalDetokenizer(tokenizer, request.prompt_ids),
                   StopMatcher(request.stop), new_generator(request.sampling))

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prompt_left(self) -> int:
        return self.prompt_len - self.num_cached

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]
