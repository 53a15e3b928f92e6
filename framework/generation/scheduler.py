"""Which sequences run in the next step: every decoding one, then prefill chunks within the token budget.

Decode rows go first so a running stream is never held back by a newcomer's prompt; what is left of
``max_num_batched_tokens`` goes to prefill, in arrival order, a prompt split into chunks across steps
when it does not fit. That bounds a step's work, and so the inter-token latency of running streams,
whatever the prompt lengths. The ``batching=continuous`` plugin chooses the budgets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from framework.generation.request import EngineConfig
from framework.generation.sequence import Sequence, Status


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    admit: list[Sequence] = field(default_factory=list)  # waiting sequences that get a slot this step

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)


def plan_step(running: list[Sequence], waiting: deque[Sequence], free_slots: int, config: EngineConfig) -> StepPlan:
    plan = StepPlan(decode=[s for s in running if s.status is Status.DECODE])
    budget = config.max_num_batched_tokens - len(plan.decode)
    # Sequences already part-way through their prompt continue before new ones are admitted.
    for seq in running:
        if budget <= 0:
            return plan
        if seq.status is Status.PREFILL:
            n = min(seq.prompt_left, budget)
            plan.prefill.append((seq, n))
            budget -= n
    for seq in waiting:
        if budget <= 0 or free_slots <= 0:
            break
        n = min(seq.prompt_left, budget)
        plan.admit.append(seq)
        plan.prefill.append((seq, n))
        budget -= n
        free_slots -= 1
    return plan
