"""What the worker loop needs from a generation engine (``framework/generation_worker.py``).

``GenerationEngine`` implements it; a model plugin may bring an engine of its own that does too
(``GenerativeModelPlugin.generation_engine``, e.g. the vLLM adapter in ``plugins/model/_vllm_engine.py``),
and admission (``QueueFullError`` -> 503), cancels, deadlines, metrics and spans work unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from framework.generation.request import EngineConfig, GenerationRequest, StepOutput


@runtime_checkable
class EngineLike(Protocol):
    #: the budgets the worker reads (``max_model_len`` bounds a request's default ``max_tokens``)
    config: EngineConfig
    #: tokens run through the model so far, by phase (exported as counters)
    prefill_tokens: int
    decode_tokens: int

    def add(self, request: GenerationRequest) -> int:
        """Queue ``request``; its sequence id. Raises ``RequestTooLongError``, ``QueueFullError`` or
        ``ValueError`` (bad parameters), as ``GenerationEngine.add`` does."""

    def cancel(self, seq_id: int) -> bool:
        """Stop ``seq_id`` now (its client went away or its deadline passed)."""

    def step(self) -> list[StepOutput]:
        """One step: each running sequence's new text, and which of them finished."""

    def has_work(self) -> bool: ...

    def finished(self, seq_id: int) -> Any | None:
        """A sequence the last ``step`` finished: ``admitted_at``, ``first_token_at``, ``finished_at``
        (``time.monotonic()``) and ``prefix_hit_tokens``; ``None`` if unknown."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def kv_usage(self) -> float:
        """Fraction of the KV cache in use."""
