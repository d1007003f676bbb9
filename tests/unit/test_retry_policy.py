"""Retry backoff: ``RetryPolicy.delays`` (drawn once per job) and its translation to RQ's ``Retry``."""

from __future__ import annotations

import random

import pytest

from keel.platform.adapters.jobs.rq_queue import rq_retry
from keel.platform.domain.jobs import NO_RETRY, RetryPolicy


def test_one_delay_per_retry() -> None:
    for retries in (0, 1, 3, 8):
        assert len(RetryPolicy(retries=retries).delays(random.Random(1))) == retries


def test_without_jitter_delays_grow_exponentially_until_the_cap() -> None:
    policy = RetryPolicy(retries=7, base=10, factor=4, cap=3600, jitter=0)
    assert policy.delays(random.Random(1)) == [10, 40, 160, 640, 2560, 3600, 3600]


def test_a_cap_below_the_base_caps_every_delay() -> None:
    assert RetryPolicy(retries=3, base=100, factor=2, cap=30, jitter=0).delays() == [30, 30, 30]


@pytest.mark.parametrize("seed", range(20))
def test_jitter_moves_each_delay_by_at_most_its_fraction(seed: int) -> None:
    policy = RetryPolicy(retries=6, base=5, factor=3, cap=600, jitter=0.2)
    exact = RetryPolicy(retries=6, base=5, factor=3, cap=600, jitter=0).delays()
    jittered = policy.delays(random.Random(seed))
    for got, nominal in zip(jittered, exact, strict=True):
        assert nominal * 0.8 <= got <= nominal * 1.2
    # The cap applies before jitter: a capped delay can exceed the cap by the jitter, never more.
    assert max(jittered) <= 600 * 1.2


def test_jitter_actually_spreads_jobs_that_fail_together() -> None:
    policy = RetryPolicy(retries=3, base=10, factor=2, jitter=0.2)
    draws = {tuple(policy.delays(random.Random(seed))) for seed in range(10)}
    assert len(draws) == 10


def test_the_same_seed_draws_the_same_delays() -> None:
    policy = RetryPolicy()
    assert policy.delays(random.Random(42)) == policy.delays(random.Random(42))


def test_no_retry_has_no_delays() -> None:
    assert NO_RETRY.retries == 0
    assert NO_RETRY.delays() == []
    assert NO_RETRY.delays(random.Random(3)) == []


def test_default_policy_is_positive_and_bounded() -> None:
    policy = RetryPolicy()
    delays = policy.delays(random.Random(7))
    assert len(delays) == policy.retries
    assert all(0 < d <= policy.cap * (1 + policy.jitter) for d in delays)


# -- RQ's Retry -----------------------------------------------------------------------------------


def test_rq_retry_of_no_delays_is_none() -> None:
    assert rq_retry([]) is None
    assert rq_retry(NO_RETRY.delays()) is None


def test_rq_retry_has_one_interval_per_retry() -> None:
    # RQ reuses the *first* interval when max exceeds the list, so the list must be exactly max long.
    delays = RetryPolicy(retries=5, base=10, factor=4, jitter=0).delays()
    retry = rq_retry(delays)
    assert retry is not None
    assert retry.max == 5
    assert retry.intervals == [10, 40, 160, 640, 2560]


@pytest.mark.parametrize(
    ("delays", "intervals"),
    [
        ([0.01, 0.5, 1.0], [1, 1, 1]),  # whole seconds, never 0 (RQ treats 0 as "requeue immediately")
        ([1.2, 2.0, 7.9], [2, 2, 8]),  # rounded up: never retried earlier than the policy said
        ([0.0], [1]),
    ],
)
def test_rq_retry_intervals_are_whole_seconds_of_at_least_one(delays: list[float], intervals: list[int]) -> None:
    retry = rq_retry(delays)
    assert retry is not None
    assert retry.max == len(delays)
    assert retry.intervals == intervals
    assert all(isinstance(i, int) for i in retry.intervals)


@pytest.mark.parametrize("seed", range(10))
def test_rq_retry_of_jittered_delays(seed: int) -> None:
    delays = RetryPolicy(retries=4, base=3, factor=2, jitter=0.3).delays(random.Random(seed))
    retry = rq_retry(delays)
    assert retry is not None
    assert retry.max == len(retry.intervals) == 4
    for interval, delay in zip(retry.intervals, delays, strict=True):
        assert isinstance(interval, int)
        assert interval >= 1
        assert delay <= interval < delay + 1
