"""Retry policies: when a failed attempt is retried, and after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from tasks.models import RetryPolicy, Scheduler


@dataclass(frozen=True)
class RetrySpec:
    policy: str = RetryPolicy.EXPONENTIAL
    max_attempts: int = 3
    delay_seconds: float = 10.0
    max_delay_seconds: float = 3600.0
    jitter: bool = True
    dead_letter: bool = True

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler) -> RetrySpec:
        return cls(
            policy=scheduler.retry_policy,
            max_attempts=scheduler.max_attempts,
            delay_seconds=scheduler.retry_delay_seconds,
            max_delay_seconds=scheduler.retry_max_delay_seconds,
            jitter=scheduler.retry_jitter,
            dead_letter=scheduler.dead_letter,
        )

    @property
    def attempts_allowed(self) -> int:
        return 1 if self.policy == RetryPolicy.NONE else self.max_attempts

    def should_retry(self, attempts_made: int) -> bool:
        """`attempts_made` counts the attempt that just failed."""
        return self.policy != RetryPolicy.NONE and attempts_made < self.max_attempts

    def delay_after(self, attempts_made: int, *, rng: random.Random | None = None) -> timedelta:
        if self.policy == RetryPolicy.FIXED:
            seconds = self.delay_seconds
        else:
            exponent = max(attempts_made - 1, 0)
            # Cap the exponent before the power so a large attempt count cannot overflow.
            seconds = min(self.max_delay_seconds, self.delay_seconds * 2 ** min(exponent, 62))
        if self.jitter and seconds > 0:
            # "Equal jitter": keeps at least half the delay, spreads the other half.
            seconds = seconds / 2 + (rng or random).uniform(0, seconds / 2)
        return timedelta(seconds=seconds)

    def exhausted_status(self) -> str:
        return "DEAD" if self.dead_letter else "FAILED"
