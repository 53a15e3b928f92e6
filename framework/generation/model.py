"""What the engine needs from a model: one batched forward per step over a KV cache it owns, by slot.

A model plugin implements this (e.g. ``plugins/model/_llama_batched.py``); the engine allocates the
slots and never looks inside the cache, so a paged or quantized cache fits behind the same call.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch


class DecodeBatch(NamedTuple):
    """One token per row: row i is ``token_ids[i]`` at ``positions[i]`` of ``slots[i]`` (all 1-D, [B])."""

    slots: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor


class PrefillChunk(NamedTuple):
    """``token_ids`` (1-D, n) at positions ``start .. start+n-1`` of ``slot``; earlier ones are cached.
    ``num_logits``: logits of the chunk's last ``num_logits`` tokens are returned (1 for a prompt, whose
    last token is sampled from; ``n`` for a speculative draft, every position of which is verified)."""

    slot: int
    token_ids: torch.Tensor
    start: int
    num_logits: int = 1


@runtime_checkable
class BatchedCausalLM(Protocol):
    """A causal LM with ``max_num_seqs`` KV slots of ``max_model_len`` positions each."""

    max_num_seqs: int
    max_model_len: int

    def forward_step(self, decode: DecodeBatch | None,
                     prefill: list[PrefillChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run every decode row and prefill chunk of a step together (one read of the weights), writing
        their KV; each row attends only to its own slot up to its position. Returns (logits of the
        decode rows [B, vocab] or None, logits of each chunk's last ``num_logits`` tokens, chunk after
        chunk [sum of num_logits, vocab], or None)."""
        ...


@runtime_checkable
class KVCopyable(Protocol):
    """A ``BatchedCausalLM`` whose slots' KV can be copied out and back in: what the prefix cache
    (``framework.generation.prefix_cache``) needs. Optional: without it the prefix cache is refused."""

    def read_kv(self, slot: int, start: int, end: int) -> torch.Tensor:
        ...

    def write_kv(self, slot: int, start: int, kv: torch.Tensor) -> None:
        ...
