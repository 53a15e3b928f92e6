"""Prompt-lookup (n-gram) speculation: guess the next tokens from the sequence's own earlier text.

When the last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``) occurred earlier in
the prompt or the output, the tokens that followed them there are the draft (vLLM's ``ngram``
method, from Saxena's prompt lookup decoding). Answers that quote their input (summaries, code edits,
retrieval-grounded answers) repeat long runs of it, so the drafts are often right.

The engine verifies a draft in one forward of ``1 + len(draft)`` tokens and keeps the longest prefix
the model itself would have produced (``GenerationEngine._verify``), so the output is the model's
whatever the draft: speculation changes how many forwards a sequence takes, never its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NgramConfig:
    num_speculative_tokens: int = 4  # draft length k: a verify forward runs k + 1 tokens
    prompt_lookup_max: int = 4  # the longest suffix looked up
    prompt_lookup_min: int = 2  # the shortest: 1 finds a match almost always, and mostly a wrong one

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.num_speculative_tokens < 1:
            out.append(("num_speculative_tokens", f"must be >= 1, got {self.num_speculative_tokens}"))
        if self.prompt_lookup_min < 1:
            out.append(("prompt_lookup_min", f"must be >= 1, got {self.prompt_lookup_min}"))
        if self.prompt_lookup_max < self.prompt_lookup_min:
            out.append(("prompt_lookup_max", f"must be >= prompt_lookup_min ({self.prompt_lookup_min}), "
                        f"got {self.prompt_lookup_max}"))
        return out


def propose(tokens: list[int], config: NgramConfig, max_len: int) -> list[int]:
    """A draft of at most ``max_len`` (and ``num_speculative_tokens``) tokens continuing ``tokens``:
    what followed the most recent earlier occurrence of its longest matching suffix; [] if none."""
    k = min(config.num_speculative_tokens, max_len)
    n_tokens = len(tokens)
    if k < 1 or n_tokens <= config.prompt_lookup_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(config.prompt_lookup_max, n_tokens - 1), config.prompt_lookup_min - 1, -1):
        suffix = arr[-n:]
        # Windows that start before the suffix itself: windows[i] == arr[i:i+n], i < n_tokens - n.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence: the nearest context
            return arr[start:start + k].tolist()
    return []
