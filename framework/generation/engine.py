"""The continuous-batching engine: ``add`` / ``cancel`` between steps, ``step`` runs one model step.

Each step admits waiting sequences into free KV slots and prefills prompts (chunked to the token
budget), runs one batched decode for every sequence whose prompt is cached, and frees the slot of
every finished or cancelled sequence at once, so a newcomer can take it at the next step.

Single-threaded by design: the caller's loop (the inference worker) calls ``add``, ``cancel`` and
``step`` from one thread, so the engine holds no locks and a step never races a cancel.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import torch

from framework.generation.model import BatchedCausalLM, DecodeBatch, KVCopyable, PrefillChunk
from framework.generation.prefix_cache import PrefixCache
from framework.generation.request import (
    EngineConfig,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    StepOutput,
    check_request,
)
from framework.generation.sampling import sample_one, sample_rows
from framework.generation.scheduler import plan_step
from framework.generation.sequence import Sequence, Status
from framework.generation.slots import SlotAllocator
from framework.generation.speculative import propose


class GenerationEngine:
    def __init__(self, model: BatchedCausalLM, tokenizer: Any, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None):
        self.config = config or EngineConfig()
        problems = self.config.problems()
        if self.config.max_num_seqs > model.max_num_seqs:
            problems.append(("max_num_seqs", f"the model was built with {model.max_num_seqs} KV slots, "
                             f"got {self.config.max_num_seqs}"))
        if self.config.max_model_len > model.max_model_len:
            problems.append(("max_model_len", f"the model's KV slots hold {model.max_model_len} positions, "
                             f"got {self.config.max_model_len}"))
        self.prefix: PrefixCache | None = None
        if self.config.prefix_cache_mb > 0:
            if isinstance(model, KVCopyable):
                self.prefix = PrefixCache(model, self.config.prefix_block_size, self.config.prefix_cache_mb * 2**20)
            else:
                problems.append(("prefix_cache_mb", f"{type(model).__name__} cannot copy KV between slots (it has "
                                 "no read_kv/write_kv); set prefix_cache_mb=0"))
        if problems:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in problems))
        self.ngram = self.config.ngram() if self.config.speculative == "ngram" else None
        self.model = model
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._slots = SlotAllocator(self.config.max_num_seqs)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        self._cancelled: list[Sequence] = []  # reported by the next step
        self._just_finished: dict[int, Sequence] = {}  # sequences the last step finished (timings, counts)
        self._ids = itertools.count()
        self.total_computed_tokens = 0
        # Tokens run through the model, by phase (the worker exports them as counters).
        self.prefill_tokens = 0
        self.decode_tokens = 0
        # Speculation: drafts verified, their tokens, and how many of those the model agreed with.
        self.spec_drafts = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0

    # --- requests ---------------------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> int:
        """Queue ``request``; returns its sequence id. Raises ``RequestTooLongError`` if it can never fit,
        ``QueueFullError`` if ``max_waiting`` requests already wait, ``ValueError`` for bad parameters."""
        self._validate(request)
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self._waiting)} requests already wait for a KV slot "
                                 f"(max_waiting={self.config.max_waiting}); retry later")
        seq = Sequence.create(next(self._ids), request, self.tokenizer)
        self._waiting.append(seq)
        self._by_id[seq.seq_id] = seq
        return seq.seq_id

    def _validate(self, request: GenerationRequest) -> None:
        check_request(request, self.config.max_model_len)

    def cancel(self, seq_id: int) -> bool:
        """Stop ``seq_id`` now: its slot is freed before the next step, which reports it as ``cancelled``.
        False if it is unknown or already finished."""
        seq = self._by_id.get(seq_id)
        if seq is None or seq.status is Status.FINISHED:
            return False
        if seq.status is Status.WAITING:
            self._waiting.remove(seq)
        else:
            self._running.remove(seq)
        self._finish(seq, "cancelled")
        self._cancelled.append(seq)
        return True

    def finished(self, seq_id: int) -> Sequence | None:
        """A sequence the last ``step`` finished (its timings: admitted, first token, finished)."""
        return self._just_finished.get(seq_id)

    def sequence(self, seq_id: int) -> Sequence | None:
        """The live sequence (None once finished and reported)."""
        return self._by_id.get(seq_id)

    # --- state for metrics and admission ------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._cancelled)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def kv_usage(self) -> float:
        """Fraction of KV positions in use across all slots."""
        used = sum(s.num_cached for s in self._running)
        return used / (self.config.max_num_seqs * self.config.max_model_len)

    # --- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = [self._output(seq, "") for seq in self._cancelled]
        for seq in self._cancelled:
            self._by_id.pop(seq.seq_id, None)
        self._cancelled.clear()

        plan = plan_step(self._running, self._waiting, self._slots.num_free, self.config)
        for seq in plan.admit:
            self._waiting.remove(seq)
            seq.slot = self._slots.allocate()
            seq.status = Status.PREFILL
            seq.admitted_at = time.monotonic()
            self._running.append(seq)
            if self.prefix is not None:
                # At most prompt_len - 1: the prompt's last token is always run, its logits give the first token.
                seq.num_cached = seq.prefix_hit_tokens = self.prefix.load(
                    seq.request.prompt_ids, seq.slot, seq.prompt_len - 1)
        if self.prefix is not None and plan.admit:  # a hit shortens its prompt's first chunk
            plan.prefill = [(seq, min(n, seq.prompt_left)) for seq, n in plan.prefill]
        if plan.decode or plan.prefill:
            outputs.extend(self._run(plan.decode, plan.prefill))

        done = [s for s in self._running if s.status is Status.FINISHED]
        self._just_finished = {s.seq_id: s for s in done}
        if done:
            self._running = [s for s in self._running if s.status is not Status.FINISHED]
            for seq in done:
                self._by_id.pop(seq.seq_id, None)
        return outputs

    def _drafts(self, decode: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, list[int]]]]:
        """Split decode rows into plain ones and speculated ones (with their drafts)."""
        if self.ngram is None or len(decode) > self.config.speculative_max_batch:
            return decode, []
        plain, verify = [], []
        for seq in decode:
            # A draft never writes past the slot, nor guesses beyond max_tokens (the +1 is the bonus token).
            room = min(seq.request.max_tokens - len(seq.output_ids) - 1, self.config.max_model_len - seq.num_cached - 1)
            draft = propose(seq.request.prompt_ids + seq.output_ids, self.ngram, room) if room > 0 else []
            if draft:
                verify.append((seq, draft))
            else:
                plain.append(seq)
        return plain, verify

    def _run(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> list[StepOutput]:
        """One model forward for the whole step (decode rows and prefill chunks share one weight read)."""
        decode, verify = self._drafts(decode)
        # Decode rows in slot order: when the slots are 0..B-1 the forward attends through a view.
        decode = sorted(decode, key=lambda s: s.slot)
        batch = None
        if decode:
            batch = DecodeBatch(torch.tensor([s.slot for s in decode]), torch.tensor([s.last_token for s in decode]),
                                torch.tensor([s.num_cached for s in decode]))
        chunks = [PrefillChunk(seq.slot, torch.tensor(seq.request.prompt_ids[seq.num_cached:seq.num_cached + n]),
                               seq.num_cached) for seq, n in prefill]
        # A draft runs as a chunk after the row's last token: logits at every position verify it.
        chunks += [PrefillChunk(seq.slot, torch.tensor([seq.last_token, *draft]), seq.num_cached, len(draft) + 1)
                   for seq, draft in verify]
        decode_logits, prefill_logits = self.model.forward_step(batch, chunks)
        for seq in decode:
            seq.num_cached += 1
            seq.computed_tokens += 1
        for seq, n in prefill:
            seq.num_cached += n
            seq.computed_tokens += n
        prefilled = sum(n for _, n in prefill)
        self.total_computed_tokens += len(decode) + prefilled
        self.prefill_tokens += prefilled
        self.decode_tokens += len(decode)
        outputs = []
        if decode:
            next_ids = sample_rows(decode_logits, [s.request.sampling for s in decode], [s.generator for s in decode])
            outputs.extend(self._append(seq, tok) for seq, tok in zip(decode, next_ids, strict=True))
        for i, (seq, _) in enumerate(prefill):
            if seq.prompt_left == 0:  # its last chunk: the first token comes from it
                seq.status = Status.DECODE
                if self.prefix is not None:
                    self.prefix.store(seq.request.prompt_ids, seq.slot, seq.num_cached)
                outputs.append(self._append(seq, sample_one(prefill_logits[i], seq.request.sampling, seq.generator)))
        row = len(prefill)
        for seq, draft in verify:
            outputs.append(self._verify(seq, draft, prefill_logits[row:row + len(draft) + 1]))
            row += len(draft) + 1
        return outputs

    def _verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> StepOutput:
        """Keep the draft's longest prefix the model agrees with, plus the model's own next token.

        Position j's token is drawn from logits[j] exactly as a plain decode step would draw it (the same
        sampler, the same generator), and the draft continues only while it equals that token: greedy
        output is unchanged, and a seeded request draws the same sequence as without speculation."""
        accepted: list[int] = []
        texts: list[str] = []
        out = None
        self.spec_drafts += 1
        self.spec_draft_tokens += len(draft)
        for j in range(len(draft) + 1):
            # Position num_cached holds the fed token (last_token, then draft[j-1] == accepted[j-1]).
            seq.num_cached += 1
            seq.computed_tokens += 1
            token = sample_one(logits[j], seq.request.sampling, seq.generator)
            out = self._append(seq, token)
            accepted.append(token)
            texts.append(out.text)
            if out.finished or j == len(draft) or token != draft[j]:
                break
        n = len(accepted)
        self.spec_accepted_tokens += n - 1
        self.total_computed_tokens += len(draft) + 1
        self.decode_tokens += n
        return StepOutput(seq.seq_id, "".join(texts), out.finished, out.finish_reason, seq.prompt_len,
                          len(seq.output_ids), tuple(accepted))

    def _append(self, seq: Sequence, token: int) -> StepOutput:
        """Record one generated token; returns the text it releases and whether the sequence ended."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.output_ids.append(token)
        req = seq.request
        if not req.ignore_eos and (token in self.eos_token_ids or token in req.stop_token_ids):
            text, stopped = seq.stop.feed(seq.detokenizer.flush())
            self._finish(seq, "stop")
            return self._output(seq, text if stopped else text + seq.stop.flush(), token)
        text, stopped = seq.stop.feed(seq.detokenizer.add(token))
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= req.max_tokens:
            tail, stopped = seq.stop.feed(seq.detokenizer.flush())
            text += tail if stopped else tail + seq.stop.flush()
            self._finish(seq, "stop" if stopped else "length")
        return self._output(seq, text, token)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        if self.prefix is not None and seq.slot is not None and reason != "cancelled":
            # The answer too: a conversation's next turn starts with this one's prompt and reply.
            self.prefix.store(seq.request.prompt_ids + seq.output_ids, seq.slot, seq.num_cached)
        if seq.slot is not None:
            self._slots.free(seq.slot)
            seq.slot = None

    @staticmethod
    def _output(seq: Sequence, text: str, token: int | None = None) -> StepOutput:
        return StepOutput(seq.seq_id, text, seq.status is Status.FINISHED, seq.finish_reason,
                          seq.prompt_len, len(seq.output_ids), () if token is None else (token,))
