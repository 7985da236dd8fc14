"""The leased beat scheduler, in process: only the lease holder sends, an expired lease is
taken over with the last run read from the database, and a beat whose lease was taken sends
nothing. Real database and broker; only time is moved. Real `celery beat` processes killed
mid-run: tests/e2e/test_beat.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from kombu.simple import SimpleQueue
from time_machine import TimeMachineFixture

from scheduler_site.beat import BEAT_LEASE, LeasedDatabaseScheduler
from scheduler_site.celery import app
from tasks import locks

T0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
QUEUE = f"beat-unit-{os.getpid()}"
LEASE = settings.BEAT_LEASE_SECONDS

pytestmark = pytest.mark.django_db(transaction=True)


def _sent() -> int:
    """Take the probe's messages off its queue: how many beat sent."""
    count = 0
    with app.connection_for_write() as conn:
        queue = SimpleQueue(conn, QUEUE)
        try:
            while True:
                try:
                    queue.get_nowait().ack()
                except SimpleQueue.Empty:
                    return count
                count += 1
        finally:
            queue.close()


@pytest.fixture
def probe(time_machine: TimeMachineFixture) -> Iterator[PeriodicTask]:
    """A job every 60 s, last run a minute before T0: due at T0."""
    time_machine.move_to(T0, tick=False)
    every, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    yield PeriodicTask.objects.create(
        name="probe", task="tests.probe", interval=every, queue=QUEUE,
        last_run_at=T0 - timedelta(seconds=60),
    )  # fmt: skip
    _sent()


def _beat() -> LeasedDatabaseScheduler:
    return LeasedDatabaseScheduler(app=app)


def _tick_all(*beats: LeasedDatabaseScheduler) -> None:
    for beat in beats:
        for _ in range(3):  # beat ticks again at once after a send
            beat.tick()


def test_leased_beat__only_the_lease_holder_sends(probe: PeriodicTask) -> None:
    first, second, third = _beat(), _beat(), _beat()

    _tick_all(first, second, third)

    assert (first.active, second.active, third.active) == (True, False, False)
    assert _sent() == 1
    assert locks.holder(BEAT_LEASE).owner == first.owner
    probe.refresh_from_db()
    assert (probe.last_run_at, probe.total_run_count) == (T0, 1), "written before it was sent"


def test_leased_beat__takes_over_an_expired_lease_from_the_database(
    probe: PeriodicTask, time_machine: TimeMachineFixture
) -> None:
    dead, heir = _beat(), _beat()
    _tick_all(dead, heir)
    assert _sent() == 1

    time_machine.move_to(T0 + timedelta(seconds=LEASE + 1), tick=False)  # `dead` stopped
    _tick_all(heir)
    assert heir.active and _sent() == 0, "sent again within the job's interval"

    time_machine.move_to(T0 + timedelta(seconds=61), tick=False)
    _tick_all(heir)
    assert _sent() == 1
    probe.refresh_from_db()
    assert probe.total_run_count == 2


def test_leased_beat__one_whose_lease_was_taken_sends_nothing(
    probe: PeriodicTask, time_machine: TimeMachineFixture
) -> None:
    paused, heir = _beat(), _beat()
    _tick_all(paused)
    _sent()
    time_machine.move_to(T0 + timedelta(seconds=LEASE + 1), tick=False)
    _tick_all(heir)  # `paused` was frozen (GC, a stopped VM) past its lease

    time_machine.move_to(T0 + timedelta(seconds=61), tick=False)
    entry = next(iter(e for e in paused.schedule.values() if e.name == "probe"))
    paused.reserve(entry)
    paused.apply_entry(entry, producer=paused.producer)  # as its tick would, without a check

    assert _sent() == 0 and not paused.active
    probe.refresh_from_db()
    assert probe.total_run_count == 1, "the fenced beat wrote its run"


def test_leased_beat__a_clean_stop_hands_over_at_once(probe: PeriodicTask) -> None:
    leaving, heir = _beat(), _beat()
    _tick_all(leaving, heir)

    leaving.close()
    _tick_all(heir)

    assert heir.active and locks.holder(BEAT_LEASE).owner == heir.owner


def test_leased_beat__a_takeover_after_schedule_changes_sends_once(
    probe: PeriodicTask, time_machine: TimeMachineFixture
) -> None:
    dead, heir = _beat(), _beat()
    assert "probe" in heir.schedule  # what a standby beat reads at start
    _tick_all(dead, heir)
    _sent()
    time_machine.move_to(T0 + timedelta(seconds=1), tick=False)
    every, _ = IntervalSchedule.objects.get_or_create(every=3600, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="other", task="tests.other", interval=every, queue=QUEUE)

    time_machine.move_to(T0 + timedelta(seconds=61), tick=False)  # due; `dead`'s lease is over
    _tick_all(heir, heir)

    assert _sent() == 1
