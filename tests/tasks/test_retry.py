"""Retry policies: whether a failed attempt is retried, after how long, and where it ends."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta

import pytest

from tasks.models import RetryPolicy, Scheduler
from tasks.retry import RetrySpec


def _seconds(spec: RetrySpec, attempts: int, rng: random.Random | None = None) -> float:
    return spec.delay_after(attempts, rng=rng).total_seconds()


@pytest.mark.parametrize("attempts", [0, 1, 2, 5, 99])
def test_retry_spec__none_never_retries(attempts: int) -> None:
    spec = RetrySpec(policy=RetryPolicy.NONE, max_attempts=100)
    assert spec.should_retry(attempts) is False


def test_retry_spec__fixed_delay_is_constant() -> None:
    spec = RetrySpec(policy=RetryPolicy.FIXED, delay_seconds=7, jitter=False, max_attempts=10)
    assert [_seconds(spec, n) for n in range(1, 8)] == [7.0] * 7


def test_retry_spec__fixed_delay_ignores_the_cap() -> None:
    spec = RetrySpec(policy=RetryPolicy.FIXED, delay_seconds=50, max_delay_seconds=10, jitter=False)
    assert _seconds(spec, 3) == 50.0


def test_retry_spec__exponential_doubles_per_attempt() -> None:
    spec = RetrySpec(
        policy=RetryPolicy.EXPONENTIAL, delay_seconds=10, max_delay_seconds=10_000, jitter=False
    )
    assert [_seconds(spec, n) for n in range(1, 6)] == [10.0, 20.0, 40.0, 80.0, 160.0]


def test_retry_spec__exponential_is_capped() -> None:
    spec = RetrySpec(
        policy=RetryPolicy.EXPONENTIAL, delay_seconds=10, max_delay_seconds=100, jitter=False
    )
    assert [_seconds(spec, n) for n in range(1, 7)] == [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]


@pytest.mark.parametrize("attempts", [64, 1_000, 10**6])
def test_retry_spec__exponential_huge_attempt_count_does_not_overflow(attempts: int) -> None:
    spec = RetrySpec(delay_seconds=10, max_delay_seconds=3600, jitter=False)
    assert spec.delay_after(attempts) == timedelta(seconds=3600)


def test_retry_spec__attempt_zero_counts_as_first() -> None:
    spec = RetrySpec(delay_seconds=10, max_delay_seconds=3600, jitter=False)
    assert _seconds(spec, 0) == _seconds(spec, 1) == 10.0


@pytest.mark.parametrize("policy", [RetryPolicy.FIXED, RetryPolicy.EXPONENTIAL])
def test_retry_spec__jitter_stays_within_half_and_full_delay(policy: str) -> None:
    jittered = RetrySpec(policy=policy, delay_seconds=10, max_delay_seconds=300, jitter=True)
    exact = RetrySpec(policy=policy, delay_seconds=10, max_delay_seconds=300, jitter=False)
    rng = random.Random(1234)
    seen: set[float] = set()
    for attempts in range(1, 9):
        full = _seconds(exact, attempts)
        for _ in range(50):
            value = _seconds(jittered, attempts, rng)
            assert full / 2 <= value <= full
            seen.add(round(value, 6))
    assert len(seen) > 100, "jitter must actually spread the delays"


def test_retry_spec__jitter_is_reproducible_with_a_seeded_rng() -> None:
    spec = RetrySpec(delay_seconds=10, jitter=True)
    first = [spec.delay_after(n, rng=random.Random(7)) for n in range(1, 5)]
    second = [spec.delay_after(n, rng=random.Random(7)) for n in range(1, 5)]
    assert first == second


def test_retry_spec__jitter_with_zero_delay_is_zero() -> None:
    spec = RetrySpec(policy=RetryPolicy.FIXED, delay_seconds=0, jitter=True)
    assert spec.delay_after(1, rng=random.Random(0)) == timedelta(0)


@pytest.mark.parametrize("policy", [RetryPolicy.FIXED, RetryPolicy.EXPONENTIAL])
def test_retry_spec__should_retry_until_max_attempts(policy: str) -> None:
    spec = RetrySpec(policy=policy, max_attempts=3)
    assert [spec.should_retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]


def test_retry_spec__single_attempt_never_retries() -> None:
    assert RetrySpec(policy=RetryPolicy.FIXED, max_attempts=1).should_retry(1) is False


def test_retry_spec__exhausted_status_dead_or_failed() -> None:
    assert RetrySpec(dead_letter=True).exhausted_status() == "DEAD"
    assert RetrySpec(dead_letter=False).exhausted_status() == "FAILED"


@pytest.mark.django_db
def test_retry_spec__for_scheduler_copies_the_queue_settings(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    scheduler = make_scheduler(
        "q",
        retry_policy=RetryPolicy.FIXED,
        max_attempts=5,
        retry_delay_seconds=4,
        retry_max_delay_seconds=40,
        retry_jitter=False,
        dead_letter=False,
    )
    assert RetrySpec.for_scheduler(scheduler) == RetrySpec(
        policy=RetryPolicy.FIXED,
        max_attempts=5,
        delay_seconds=4,
        max_delay_seconds=40,
        jitter=False,
        dead_letter=False,
    )
