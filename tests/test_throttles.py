"""The per-account API rate (scheduler_site/throttles.py): the limit within a window, the
previous window's weight after it, and state that does not grow with the request rate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from rest_framework.test import APIClient
from rest_framework.throttling import SimpleRateThrottle
from time_machine import TimeMachineFixture

WINDOW_START = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def four_a_minute(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"anon": "100/min", "user": "4/min"})
    cache.clear()
    yield
    cache.clear()


def _statuses(client: APIClient, count: int) -> list[int]:
    return [client.get("/api/schedulers/").status_code for _ in range(count)]


@pytest.mark.django_db
def test_user_throttle__the_rate_holds_then_the_last_window_weighs_less_as_it_slides(
    four_a_minute: None, operator_client: APIClient, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(WINDOW_START + timedelta(seconds=50), tick=False)
    assert _statuses(operator_client, 5) == [200, 200, 200, 200, 429]
    refused = operator_client.get("/api/schedulers/")
    assert refused.status_code == 429 and int(refused["Retry-After"]) == 10  # the window's rest
    # 30 s into the next window, the 4 of the last one weigh 4 * 0.5 = 2: two more fit.
    time_machine.move_to(WINDOW_START + timedelta(seconds=90), tick=False)
    assert _statuses(operator_client, 3) == [200, 200, 429]
    # Two windows on, nothing of those is left.
    time_machine.move_to(WINDOW_START + timedelta(seconds=180), tick=False)
    assert _statuses(operator_client, 4) == [200] * 4


@pytest.mark.django_db
def test_user_throttle__its_state_is_a_count_whatever_the_rate(
    monkeypatch: pytest.MonkeyPatch,
    operator: User,
    operator_client: APIClient,
    time_machine: TimeMachineFixture,
) -> None:
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"anon": "9/min", "user": "9999/min"})
    cache.clear()
    time_machine.move_to(WINDOW_START + timedelta(seconds=5), tick=False)
    assert set(_statuses(operator_client, 50)) == {200}
    window = int(WINDOW_START.timestamp() // 60)
    assert cache.get(f"throttle_user_{operator.pk}:{window}") == 50
    assert cache.get(f"throttle_user_{operator.pk}") is None  # DRF's list of request times
    cache.clear()
