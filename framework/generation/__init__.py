"""The generation engine: continuous batching for causal language models, step by step, in pure torch.

Framework mechanism only (request and sequence state, the scheduler loop, KV slot allocation, sampling,
stop strings, incremental detokenization). The model-specific batched forward comes from a model
plugin as a ``BatchedCausalLM`` (see ``framework.generation.model``).

Example::

    engine = GenerationEngine(forward, tokenizer, EngineConfig(max_num_seqs=16))
    sid = engine.add(GenerationRequest(prompt_ids=[...], max_tokens=64, stop=["\\n\\n"]))
    while engine.has_work():
        for out in engine.step():
            print(out.seq_id, out.text, out.finished, out.finish_reason)
"""

from framework.generation.engine import GenerationEngine
from framework.generation.interface import EngineLike
from framework.generation.model import BatchedCausalLM, DecodeBatch, PrefillChunk
from framework.generation.request import (
    EngineConfig,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestTooLongError,
    SamplingParams,
    StepOutput,
)

__all__ = [
    "BatchedCausalLM",
    "DecodeBatch",
    "EngineConfig",
    "EngineLike",
    "FinishReason",
    "GenerationEngine",
    "GenerationRequest",
    "PrefillChunk",
    "QueueFullError",
    "RequestTooLongError",
    "SamplingParams",
    "StepOutput",
]
