"""Batching policies as pure logic: a fake clock (plain floats), no threads, no sleeping.

The last tests replay seeded Poisson arrivals through a tiny discrete-event model of the worker
loop (plan on each arrival / ended wait, whole requests FIFO, record after each batch). Simulated
time is deterministic, so these are behaviour checks, not timing assertions.
"""

from __future__ import annotations

import collections
import math
import random

import pytest

from framework.config import compose, validate
from framework.errors import ConfigError
from plugins.batching._arrival_rate import ArrivalRate, PendingTracker
from plugins.batching._cost_model import CostModel
from plugins.batching.adaptive import AdaptiveBatching, AdaptiveBatchingConfig
from plugins.batching.dynamic import DynamicBatching, DynamicBatchingConfig
from plugins.batching.none import NoBatching

INF = math.inf
T0 = 1000.0  # monotonic clocks do not start at zero


def cpu_cost(b: int) -> float:  # per-item cost dominates (a transformer on a CPU)
    return 0.001 + 0.004 * b


def gpu_cost(b: int) -> float:  # fixed launch cost dominates (a small model on a GPU)
    return 0.008 + 0.0002 * b


def teach(policy, cost, sizes=(1, 2, 4, 8, 16), repeats=3) -> None:
    for _ in range(repeats):
        for b in sizes:
            policy.record(b, cost(b))


def adaptive(**kw) -> AdaptiveBatching:
    return AdaptiveBatching(AdaptiveBatchingConfig(**kw))


def dynamic(**kw) -> DynamicBatching:
    return DynamicBatching(DynamicBatchingConfig(**kw))


def feed_arrivals(policy, gap: float, count: int, cost=None, start: float = T0) -> float:
    """Show the policy ``count`` single-item arrivals ``gap`` apart, each run alone; return the time."""
    now = start
    for _ in range(count):
        policy.plan(1, now, INF, now)
        if cost is not None:
            policy.record(1, cost(1))
        now += gap
    return now


# ------------------------------------------------------------------------------------------ adaptive
def test_adaptive_idle_lone_request_runs_immediately_without_learning():
    policy = adaptive()
    decision = policy.plan(1, T0, INF, T0)
    assert decision.run and decision.size == 1 and decision.wait_s == 0.0


def test_adaptive_empty_queue_does_not_run():
    assert adaptive().plan(0, T0, INF, T0).run is False


def test_adaptive_low_load_never_waits_even_when_batching_is_cheap():
    policy = adaptive(max_wait_ms=5.0)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=1.0, count=5, cost=gpu_cost)  # 1 request/s
    decision = policy.plan(1, now, INF, now)
    assert decision.run and decision.size == 1


def test_adaptive_cpu_cost_never_waits_at_high_load():
    policy = adaptive(max_wait_ms=5.0)
    teach(policy, cpu_cost)
    now = feed_arrivals(policy, gap=0.0002, count=50, cost=cpu_cost)  # 5000 requests/s
    decision = policy.plan(1, now, INF, now)
    assert decision.run, "with per-item cost dominating, waiting for company never pays"


def test_adaptive_waits_briefly_when_fixed_cost_dominates_and_arrivals_are_close():
    policy = adaptive(max_wait_ms=5.0)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=0.0005, count=50, cost=gpu_cost)  # 2000/s: next in ~0.5 ms
    decision = policy.plan(1, now, INF, now)
    assert not decision.run
    breakeven = (policy.cost.intercept - policy.cost.slope) / 2
    assert 0 < decision.wait_s <= min(breakeven, 0.005) + 1e-12
    # The wait ends with nobody new: run, and do not start another wait for the same request.
    later = now + decision.wait_s
    again = policy.plan(1, now, INF, later)
    assert again.run and again.size == 1


def test_adaptive_wait_is_capped_by_max_wait_ms():
    policy = adaptive(max_wait_ms=0.1)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=0.0005, count=50, cost=gpu_cost)
    decision = policy.plan(1, now, INF, now)
    assert not decision.run and decision.wait_s <= 0.0001 + 1e-12


def test_adaptive_max_wait_zero_never_waits():
    policy = adaptive(max_wait_ms=0.0)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=0.0005, count=50, cost=gpu_cost)
    assert policy.plan(1, now, INF, now).run


def test_adaptive_backlog_fills_to_what_the_learned_cost_allows_under_target():
    policy = adaptive(max_batch_size=64, target_latency_ms=20.0)
    teach(policy, lambda b: 0.002 + 0.001 * b)
    # 30 items pending, the oldest just arrived: 2 ms + 1 ms * b <= 20 ms  ->  b = 18.
    decision = policy.plan(30, T0, INF, T0)
    assert decision.run and decision.size == 18
    # The oldest has already waited 5 ms: 15 ms left  ->  b = 13.
    decision = policy.plan(30, T0 - 0.005, INF, T0)
    assert decision.run and decision.size == 13


def test_adaptive_deep_backlog_is_drained_with_full_batches():
    policy = adaptive(max_batch_size=64, target_latency_ms=20.0)
    teach(policy, lambda b: 0.002 + 0.001 * b)
    # 18 items meet the 20 ms target, but 60 are waiting (>= 3 target-sized batches): most miss the
    # target anyway, so the batcher stops paying the per-batch cost 3-4 times over.
    decision = policy.plan(60, T0, INF, T0)
    assert decision.run and decision.size == 60
    assert policy.plan(200, T0, INF, T0).size == 64


def test_adaptive_backlog_smaller_than_allowed_runs_everything():
    policy = adaptive(max_batch_size=64, target_latency_ms=20.0)
    teach(policy, lambda b: 0.002 + 0.001 * b)
    decision = policy.plan(7, T0, INF, T0)
    assert decision.run and decision.size == 7


def test_adaptive_late_oldest_runs_the_largest_batch_allowed():
    policy = adaptive(max_batch_size=16, target_latency_ms=20.0)
    teach(policy, lambda b: 0.002 + 0.001 * b)
    decision = policy.plan(40, T0 - 0.050, INF, T0)  # already 50 ms old: the target is lost
    assert decision.run and decision.size == 16


def test_adaptive_full_batch_runs_at_once():
    policy = adaptive(max_batch_size=8)
    decision = policy.plan(8, T0, INF, T0)
    assert decision.run and decision.size == 8
    decision = policy.plan(20, T0, INF, T0)
    assert decision.run and decision.size == 8


def test_adaptive_batches_keep_up_with_the_arrival_rate():
    cost = lambda b: 0.010 + 0.0005 * b  # noqa: E731
    policy = adaptive(max_batch_size=64, target_latency_ms=20.0)
    teach(policy, cost)
    assert policy.plan(40, T0, INF, T0).size == 20  # the 20 ms target alone fits 20 items
    policy = adaptive(max_batch_size=64, target_latency_ms=20.0)
    teach(policy, cost)
    # ~1000 items/s for two seconds: 20-item batches serve only 20 / 20 ms = 1000 items/s, no margin.
    now = feed_arrivals(policy, gap=0.001, count=2000, cost=cost)
    decision = policy.plan(40, now, INF, now)
    assert decision.run and 20 < decision.size <= 40
    expected = policy.cost.smallest_sustaining(1.25 * policy.arrivals.rate, 40)
    assert decision.size == expected


# ------------------------------------------------------------------------------------------ deadlines
@pytest.mark.parametrize("make", [
    lambda: adaptive(max_wait_ms=50.0, target_latency_ms=1000.0),
    lambda: dynamic(max_delay_ms=50.0),
])
def test_never_waits_past_the_earliest_deadline_minus_batch_cost(make):
    rng = random.Random(7)
    for _ in range(300):
        policy = make()
        teach(policy, gpu_cost)
        now = feed_arrivals(policy, gap=0.0003, count=30, cost=gpu_cost)
        pending = rng.randint(1, 20)
        oldest = now - rng.uniform(0, 0.01)
        deadline = now + rng.uniform(-0.005, 0.04)
        decision = policy.plan(pending, oldest, deadline, now)
        if not decision.run:
            assert decision.wait_s > 0
            assert now + decision.wait_s + policy.cost.predict(pending) <= deadline + 1e-12


def test_adaptive_runs_now_when_the_deadline_leaves_no_room():
    policy = adaptive(max_wait_ms=50.0)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=0.0005, count=50, cost=gpu_cost)
    assert not policy.plan(1, now, INF, now).run  # it would wait...
    policy = adaptive(max_wait_ms=50.0)
    teach(policy, gpu_cost)
    now = feed_arrivals(policy, gap=0.0005, count=50, cost=gpu_cost)
    decision = policy.plan(1, now, now + gpu_cost(2) - 0.0001, now)  # ...but not with this deadline
    assert decision.run


def test_dynamic_runs_now_when_the_deadline_leaves_no_room():
    policy = dynamic(max_delay_ms=10.0)
    teach(policy, gpu_cost)
    decision = policy.plan(2, T0, T0 + gpu_cost(2) + 0.001, T0)
    assert not decision.run and decision.wait_s == pytest.approx(0.001)
    decision = policy.plan(2, T0, T0 + gpu_cost(2) - 0.001, T0)
    assert decision.run and decision.size == 2


# ------------------------------------------------------------------------------------------- dynamic
def test_dynamic_waits_at_most_max_delay_then_runs():
    policy = dynamic(max_batch_size=16, max_delay_ms=5.0)
    decision = policy.plan(1, T0, INF, T0)
    assert not decision.run and decision.wait_s == pytest.approx(0.005)
    decision = policy.plan(3, T0, INF, T0 + 0.002)  # two more arrived 2 ms later
    assert not decision.run and decision.wait_s == pytest.approx(0.003)
    decision = policy.plan(3, T0, INF, T0 + 0.005)
    assert decision.run and decision.size == 3


def test_dynamic_zero_delay_runs_at_once():
    decision = dynamic(max_delay_ms=0.0).plan(1, T0, INF, T0)
    assert decision.run and decision.size == 1


def test_dynamic_runs_a_full_batch_without_waiting():
    decision = dynamic(max_batch_size=4, max_delay_ms=100.0).plan(9, T0, INF, T0)
    assert decision.run and decision.size == 4


def test_dynamic_runs_the_largest_preferred_size_that_can_be_formed():
    policy = dynamic(max_batch_size=32, max_delay_ms=100.0, preferred_batch_sizes=[8, 4])
    assert not policy.plan(3, T0, INF, T0).run
    assert policy.plan(4, T0, INF, T0) == policy.plan(5, T0, INF, T0)
    decision = policy.plan(5, T0, INF, T0)
    assert decision.run and decision.size == 4
    decision = policy.plan(12, T0, INF, T0)
    assert decision.run and decision.size == 8
    decision = policy.plan(40, T0, INF, T0)
    assert decision.run and decision.size == 32


def test_dynamic_empty_queue_does_not_run():
    assert dynamic().plan(0, T0, INF, T0).run is False


def test_max_request_items_is_max_batch_size():
    assert dynamic(max_batch_size=12).max_request_items() == 12
    assert adaptive(max_batch_size=24).max_request_items() == 24


# ---------------------------------------------------------------------------------------- cost model
def test_cost_model_learns_a_linear_cost():
    model = CostModel()
    rng = random.Random(3)
    for _ in range(400):
        b = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
        model.record(b, (0.003 + 0.0015 * b) * rng.uniform(0.95, 1.05))
    assert model.intercept == pytest.approx(0.003, rel=0.25)
    assert model.slope == pytest.approx(0.0015, rel=0.1)
    assert model.predict(20) == pytest.approx(0.033, rel=0.05)


def test_cost_model_before_any_sample_predicts_its_prior():
    assert CostModel().predict(8) == 0.0 and not CostModel().ready
    assert CostModel(prior=(0.001, 0.002)).predict(4) == pytest.approx(0.009)


def test_cost_model_with_one_size_assumes_all_cost_is_per_item():
    model = CostModel()
    for _ in range(10):
        model.record(1, 0.005)
    assert model.intercept == 0.0
    assert model.predict(4) == pytest.approx(0.020)


def test_cost_model_clips_outliers():
    model = CostModel()
    for _ in range(20):
        for b in (1, 8):
            model.record(b, 0.002 + 0.001 * b)
    model.record(8, 5.0)  # a GC pause or a compile: one slow batch must not teach "batches are slow"
    assert model.predict(8) < 0.010 * 1.8
    model.record(4, 3.0)  # first batch of a new shape, with a compile in it
    assert model.predict(4) < 0.006 * 2


def test_cost_model_follows_a_machine_that_slows_down():
    model = CostModel()
    for _ in range(50):
        for b in (1, 8):
            model.record(b, 0.001 * b)
    for _ in range(50):
        for b in (1, 8):
            model.record(b, 0.002 * b)
    assert model.slope == pytest.approx(0.002, rel=0.05)


def test_cost_model_ignores_failed_batches():
    model = CostModel()
    model.record(0, 0.1)
    model.record(4, float("nan"))
    model.record(4, -1.0)
    assert not model.ready


def test_arrival_rate_estimates_and_forgets():
    rate = ArrivalRate(window_s=1.0)
    now = 0.0
    for _ in range(500):
        now += 0.01
        rate.observe(now, 1)
    assert rate.rate == pytest.approx(100, rel=0.05)
    rate.observe(now + 10.0, 1)  # ten idle seconds
    assert rate.rate < 1.0


def test_pending_tracker_counts_new_arrivals_only():
    tracker = PendingTracker()
    assert tracker.arrivals(3) == 3
    tracker.taken(2)
    assert tracker.arrivals(4) == 3  # 1 left + 3 new
    assert tracker.arrivals(2) == 0  # the loop dropped expired requests


# -------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, key", [
    (["batching=dynamic", "batching.max_batch_size=0"], "batching.max_batch_size"),
    (["batching=dynamic", "batching.max_delay_ms=-1"], "batching.max_delay_ms"),
    (["batching=dynamic", "batching.preferred_batch_sizes=[4,64]"], "batching.preferred_batch_sizes"),
    (["batching=adaptive", "batching.max_batch_size=0"], "batching.max_batch_size"),
    (["batching=adaptive", "batching.target_latency_ms=0"], "batching.target_latency_ms"),
    (["batching=adaptive", "batching.max_wait_ms=-0.5"], "batching.max_wait_ms"),
    (["batching=adaptive", "+batching.max_delay_ms=3"], "batching.max_delay_ms"),
])
def test_config_errors_name_the_full_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose([*overrides, "model=echo"]))
    assert key in str(info.value)


@pytest.mark.parametrize("name", ["dynamic", "adaptive", "none"])
def test_shipped_yaml_validates(name):
    resolved = validate(compose([f"batching={name}", "model=echo"]))
    assert resolved.names()["batching"] == name


def test_dynamic_yaml_accepts_preferred_sizes():
    resolved = validate(compose(["batching=dynamic", "batching.preferred_batch_sizes=[4,8]", "model=echo"]))
    assert resolved.batching.config.preferred_batch_sizes == [4, 8]


# ------------------------------------------------------------------------------------- load replays
def replay(policy, rate: float, cost, requests: int = 2000, seed: int = 0) -> dict:
    """Open-loop Poisson arrivals through a model of the worker loop; simulated seconds."""
    rng = random.Random(seed)
    arrivals, t = [], T0
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    pending: collections.deque[float] = collections.deque()
    latencies, i, now = [], 0, T0
    while i < len(arrivals) or pending:
        while i < len(arrivals) and arrivals[i] <= now:
            pending.append(arrivals[i])
            i += 1
        oldest = pending[0] if pending else now
        decision = policy.plan(len(pending), oldest, oldest + 30.0 if pending else INF, now)
        if decision.run:
            batch = [pending.popleft() for _ in range(max(1, min(decision.size, len(pending))))]
            now += cost(len(batch))
            policy.record(len(batch), cost(len(batch)))
            latencies += [now - a for a in batch]
        elif not pending:
            now = arrivals[i]  # the loop blocks until an arrival
        else:
            assert decision.wait_s > 0
            wake = now + decision.wait_s
            now = min(wake, arrivals[i]) if i < len(arrivals) else wake
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2], "throughput": len(latencies) / (now - T0)}


@pytest.mark.parametrize("cost", [cpu_cost, gpu_cost], ids=["cpu-like", "gpu-like"])
def test_replay_low_load_adaptive_p50_equals_none(cost):
    rate = 0.1 / cost(1)
    assert replay(adaptive(), rate, cost)["p50"] == pytest.approx(replay(NoBatching(), rate, cost)["p50"])


@pytest.mark.parametrize("cost", [cpu_cost, gpu_cost], ids=["cpu-like", "gpu-like"])
def test_replay_saturation_adaptive_keeps_up_with_the_best_dynamic(cost):
    rate = 3.0 * 32 / cost(32)  # well past what even full batches can serve
    best = max(replay(dynamic(max_delay_ms=d), rate, cost)["throughput"] for d in (2.0, 10.0))
    assert replay(adaptive(), rate, cost)["throughput"] >= 0.95 * best
    assert replay(adaptive(), rate, cost)["throughput"] > 1.2 * replay(NoBatching(), rate, cost)["throughput"]
