"""Token ids to text as they are produced: incremental detokenization and stop strings.

``IncrementalDetokenizer`` follows the offsets scheme of TGI and vLLM: decode a short window of
recent ids and emit only what the window adds, so a token that completes a multi-byte character (or
a word piece whose spacing depends on its neighbour) is emitted once it is whole, never as U+FFFD.
``StopMatcher`` holds back the tail that could still become a stop string, so a stop string split
across tokens is caught and none of it is ever emitted.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``add(token_id) -> new text``; ``flush()`` at the end returns whatever is still held."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], context: int = 4):
        self._tokenizer = tokenizer
        # A few prompt ids as context: the first generated token decodes as it would mid-text.
        self._ids = list(prompt_ids[-context:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            new = text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return new
        return ""  # an incomplete character (or nothing visible yet): wait for the next token

    def flush(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]


class StopMatcher:
    """``feed(text) -> (text safe to emit, stopped)``; ``flush()`` returns the held tail at the end."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
