"""``batching=continuous``: continuous batching for generative models, run by the generation engine.

Not a one-shot batcher: ``plan`` is never called. The worker hands each request to
``framework.generation.GenerationEngine`` with the budgets below (``engine_config``), and every engine
step runs one token for each running sequence plus prefill chunks of waiting prompts; a sequence joins
or leaves the batch between any two steps. Each request carries one prompt (``max_request_items``).

Latency against throughput: fewer ``max_num_seqs`` and a smaller ``max_num_batched_tokens`` make each
step shorter (lower inter-token latency for the running streams); more give more tokens per second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from framework import BatchingPlugin, CheckContext, GenerativeModelPlugin
from framework.generation import EngineConfig


@dataclass
class ContinuousBatchingConfig:
    max_num_seqs: int = 16  # sequences generating at once (each holds a KV slot): the decode batch's size
    max_num_batched_tokens: int = 256  # a step's token budget: decode rows + prefill chunks (prompts are chunked)
    max_model_len: int = 1024  # prompt + output tokens per sequence; the KV cache is max_num_seqs x this
    max_waiting: int = 64  # requests queued for a KV slot; beyond it 503 + Retry-After

    def problems(self) -> list[tuple[str, str]]:
        return EngineConfig(**dataclasses.asdict(self)).problems()


class ContinuousBatching(BatchingPlugin):
    Config = ContinuousBatchingConfig

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**dataclasses.asdict(self.config))

    def max_request_items(self) -> int | None:
        return 1  # one prompt per request; the engine batches sequences, not items

    def check(self, ctx: CheckContext) -> list[str]:
        if ctx.model is None or isinstance(ctx.model, GenerativeModelPlugin):
            return []
        name = type(ctx.model).__module__.rsplit(".", 1)[-1] or type(ctx.model).__name__
        return [f"batching=continuous schedules token generation; model={name} is a one-shot model: "
                "use batching=adaptive"]


PLUGIN = ContinuousBatching
