"""What the engine needs from a model: a batched forward over a KV cache it owns, addressed by slot.

A model plugin implements this (e.g. ``plugins/model/_llama_batched.py``); the engine allocates the
slots and never looks inside the cache, so a paged or quantized cache fits behind the same calls.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchedCausalLM(Protocol):
    """A causal LM with ``max_num_seqs`` KV slots of ``max_model_len`` positions each."""

    max_num_seqs: int
    max_model_len: int

    def prefill(self, slot: int, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``token_ids`` (1-D, n tokens) at positions ``start .. start+n-1`` of ``slot``, writing their KV;
        positions before ``start`` are already in the slot. Returns the logits of the last position, [vocab]."""
        ...

    def decode(self, slots: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: row i is ``token_ids[i]`` at ``positions[i]`` of ``slots[i]`` (all 1-D, [B]).
        Writes their KV, attends each row to its own slot up to its position. Returns logits, [B, vocab]."""
        ...
