"""``batching=continuous``: continuous batching for generative models, run by the generation engine.

Not a one-shot batcher: ``plan`` is never called. The worker hands each request to
``framework.generation.GenerationEngine`` with the budgets below (``engine_config``), and every engine
step runs one token for each running sequence plus prefill chunks of waiting prompts; a sequence joins
or leaves the batch between any two steps. Each request carries one prompt (``max_request_items``).

Latency against throughput: fewer ``max_num_seqs`` and a smaller ``max_num_batched_tokens`` make each
step shorter (lower inter-token latency for the running streams); more give more tokens per second.

Two levers cut the work itself: the prefix cache (``prefix_cache_mb``) reuses the KV of prompt
prefixes an earlier request computed (a system prompt, a conversation's earlier turns), so the time
to the first token pays only for the new tokens; speculative decoding (``speculative=ngram``) drafts
tokens from the sequence's own text and verifies several in one forward, fewer forwards per token
when the answer quotes its input. Neither changes a greedy answer.
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
    prefix_cache_mb: int = 256  # KV of earlier prompts and answers kept for reuse (0 = off)
    prefix_block_size: int = 16  # tokens per prefix-cache block: a hit covers whole blocks
    speculative: str = "off"  # "ngram": prompt-lookup speculative decoding (greedy output unchanged)
    num_speculative_tokens: int = 4  # draft length: a verify forward runs this + 1 tokens
    prompt_lookup_max: int = 4  # longest suffix of the sequence looked up in its earlier tokens
    prompt_lookup_min: int = 2  # shortest suffix looked up
    speculative_max_batch: int = 4  # speculate only while at most this many sequences decode

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
