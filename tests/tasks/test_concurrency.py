"""Several processes at once on the real database: no task popped twice, none lost, no
transition applied twice. The PostgreSQL leg runs every test here; the SQLite leg runs those
not marked `postgres` (there IMMEDIATE transactions serialise the writers)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection, connections
from django.utils import timezone

from tasks import batches, housekeeping, services
from tasks.exceptions import DuplicateTask, QueueFull, TransitionRefused
from tasks.leases import LeaseProof
from tasks.models import (
    LEASED_STATUSES,
    REQUEUEABLE_STATUSES,
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
)
from tests.processes import run_in_processes, shared_barrier
from tests.support.seed import force_status, seed_queued

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

PROCESSES = 8
CLAIM_PHASE = 20  # claims each process makes between two meetings


def _bulk_queue(scheduler_id: str, count: int, **fields: Any) -> None:
    seed_queued(scheduler_id, count, **fields)


def _pop_until_empty(index: int, scheduler_id: str, limit: int) -> list[str]:
    popped: list[str] = []
    while True:
        tasks = services.task_pop(scheduler_id=scheduler_id, limit=limit, worker=f"w{index}")
        if not tasks:
            return popped
        popped.extend(str(task.id) for task in tasks)


@pytest.mark.parametrize("limit", [1, 25])
def test_task_pop__concurrent_poppers_get_each_task_exactly_once(limit: int) -> None:
    total = 5000 if connection.vendor == "postgresql" else 1500
    services.scheduler_create(id="conc")
    _bulk_queue("conc", total)

    results = run_in_processes(PROCESSES, _pop_until_empty, "conc", limit)

    popped = [task_id for chunk in results for task_id in chunk]
    assert len(popped) == total
    assert len(set(popped)) == total, "a task was handed out twice"
    assert Task.objects.filter(scheduler_id="conc", status=TaskStatus.DISPATCHED).count() == total
    assert not Task.objects.filter(attempts__gt=1).exists()
    pop_events = TaskEvent.objects.filter(to_status=TaskStatus.DISPATCHED)
    assert pop_events.count() == total
    assert sum(1 for chunk in results if chunk) > 1, "only one process ever won a pop"


def _push_same_hash(index: int, scheduler_id: str) -> tuple[str, str]:
    try:
        task = services.task_push(scheduler_id=scheduler_id, hash="same", data={"by": index})
        return ("created", str(task.id))
    except DuplicateTask as exc:
        return ("duplicate", str(exc.existing_id))


def test_task_push__concurrent_same_hash_creates_exactly_one() -> None:
    services.scheduler_create(id="dedup")

    results = run_in_processes(PROCESSES, _push_same_hash, "dedup")

    outcomes = Counter(kind for kind, _ in results)
    assert outcomes == {"created": 1, "duplicate": PROCESSES - 1}
    created_id = next(task_id for kind, task_id in results if kind == "created")
    assert {task_id for _, task_id in results} == {created_id}
    assert Task.objects.filter(scheduler_id="dedup", hash="same").count() == 1


def _push_many(index: int, scheduler_id: str, count: int) -> int:
    accepted = 0
    for _ in range(count):
        try:
            services.task_push(scheduler_id=scheduler_id, data={"by": index})
            accepted += 1
        except QueueFull:
            pass
    return accepted


def test_task_push__concurrent_pushes_never_overfill_a_bounded_queue() -> None:
    services.scheduler_create(id="bounded", max_queue_size=50)

    accepted = run_in_processes(PROCESSES, _push_many, "bounded", 15)

    assert sum(accepted) == 50
    assert Task.objects.filter(scheduler_id="bounded", status=TaskStatus.QUEUED).count() == 50


def _complete_or_fail(index: int, task_id: str) -> str:
    try:
        if index % 2:
            services.task_complete(task_id=task_id, result={"by": index})
        else:
            services.task_fail(task_id=task_id, error=f"by {index}")
        return "applied"
    except TransitionRefused:
        return "refused"


def test_task_report__racing_reports_apply_exactly_one() -> None:
    services.scheduler_create(id="race", retry_policy="none")
    pushed = services.task_push(scheduler_id="race")
    (task,) = services.task_pop(scheduler_id="race")
    assert task.id == pushed.id

    results = run_in_processes(PROCESSES, _complete_or_fail, str(task.id))

    assert Counter(results) == {"applied": 1, "refused": PROCESSES - 1}
    task.refresh_from_db()
    assert task.status in {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD}
    finals = TaskEvent.objects.filter(task=task).exclude(to_status__in=["QUEUED", "DISPATCHED"])
    assert finals.count() == 1


def _reap(index: int, travel_to: str) -> int:
    with time_machine.travel(travel_to, tick=False):
        return housekeeping.tasks_reap_expired(batch_size=50)


def _expire_all(scheduler_id: str, count: int) -> str:
    _bulk_queue(scheduler_id, count)
    while services.task_pop(scheduler_id=scheduler_id, limit=100):
        pass
    scheduler = Scheduler.objects.get(id=scheduler_id)
    return (timezone.now() + timedelta(seconds=scheduler.lease_seconds + 60)).isoformat()


@pytest.mark.postgres
def test_tasks_reap_expired__concurrent_reapers_reap_each_lease_once() -> None:
    services.scheduler_create(id="reap", max_attempts=3, retry_jitter=False)
    later = _expire_all("reap", 600)

    reaped = run_in_processes(4, _reap, later)

    assert sum(reaped) == 600
    assert Task.objects.filter(scheduler_id="reap", status=TaskStatus.QUEUED).count() == 600
    per_task = Counter(
        TaskEvent.objects.filter(
            from_status=TaskStatus.DISPATCHED, to_status=TaskStatus.QUEUED
        ).values_list("task_id", flat=True)
    )
    assert len(per_task) == 600
    assert set(per_task.values()) == {1}, "a lease was reaped twice"


def test_tasks_reap_expired__lost_task_comes_back_then_dies_when_attempts_are_spent() -> None:
    services.scheduler_create(id="lost", max_attempts=2, retry_jitter=False, retry_delay_seconds=1)
    task = services.task_push(scheduler_id="lost")
    start = timezone.now()
    for attempt in (1, 2):
        with time_machine.travel(start + timedelta(hours=attempt), tick=False):
            (popped,) = services.task_pop(scheduler_id="lost")
            assert popped.id == task.id and popped.attempts == attempt
        with time_machine.travel(start + timedelta(hours=attempt, minutes=30), tick=False):
            assert housekeeping.tasks_reap_expired() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.DEAD
    assert task.error == "lease expired (lost)"
    notes = list(TaskEvent.objects.filter(task=task).values_list("to_status", flat=True))
    assert notes == ["QUEUED", "DISPATCHED", "QUEUED", "DISPATCHED", "DEAD"]


def _heartbeat_or_reap(index: int, task_ids: list[str], travel_to: str) -> Counter[str]:
    outcome: Counter[str] = Counter()
    with time_machine.travel(travel_to, tick=False):
        for task_id in task_ids:
            if index % 2:
                try:
                    services.task_heartbeat(task_id=task_id)
                    outcome["heartbeat"] += 1
                except TransitionRefused:
                    outcome["late"] += 1
            else:
                outcome["reaped"] += housekeeping.tasks_reap_expired(batch_size=10)
    return outcome


@pytest.mark.postgres
def test_task_heartbeat__racing_the_reaper_never_leaves_a_task_both_leased_and_requeued() -> None:
    services.scheduler_create(id="hb", retry_jitter=False)
    later = _expire_all("hb", 200)
    ids = [str(i) for i in Task.objects.filter(scheduler_id="hb").values_list("id", flat=True)]

    run_in_processes(4, _heartbeat_or_reap, ids, later)

    for task in Task.objects.filter(scheduler_id="hb"):
        requeued = TaskEvent.objects.filter(
            task=task, from_status=TaskStatus.DISPATCHED, to_status=TaskStatus.QUEUED
        ).count()
        if task.status == TaskStatus.DISPATCHED:
            assert requeued == 0 and task.attempts == 1
        else:
            assert task.status == TaskStatus.QUEUED and requeued == 1


# --- the Celery worker's claim and report (one statement each on PostgreSQL) ----------------


def _dispatched_celery_tasks(scheduler_id: str, count: int) -> list[tuple[str, int]]:
    """`count` tasks of a celery queue, DISPATCHED on attempt 1 (as dispatch leaves them)."""
    services.scheduler_create(
        id=scheduler_id, kind="celery", handler="demo.echo", dispatch_threshold=count
    )
    _bulk_queue(scheduler_id, count)
    force_status(
        Task.objects.filter(scheduler_id=scheduler_id).values_list("id", flat=True),
        TaskStatus.DISPATCHED,
        attempts=1,
        lease_expires_at=timezone.now(),
    )
    return [(str(i), 1) for i in Task.objects.values_list("id", flat=True)]


def _claim_all(index: int, claims: list[tuple[str, int]], phase: Any) -> list[str]:
    # Every process walks every task, as workers do when a message is delivered twice. Two
    # processes start at each of four points and walk in step, so each pair claims the same
    # task at the same moment; the others are elsewhere in the queue, so winners are spread.
    won = []
    offset = (index // 2) * len(claims) // (PROCESSES // 2)
    walk = claims[offset:] + claims[:offset]
    for start in range(0, len(walk), CLAIM_PHASE):
        for task_id, attempt in walk[start : start + CLAIM_PHASE]:
            try:
                services.task_start(task_id=task_id, actor=f"w{index}", attempt=attempt)
                won.append(task_id)
            except TransitionRefused:
                pass
        # SQLite's busy handler lets one process take every claim while the others back off
        # (it failed CI twice: "only one process ever won a claim"). Meeting after each phase
        # keeps all eight in the race.
        phase.wait(timeout=120)
    return won


def test_task_start__racing_claims_of_one_attempt_start_each_task_once() -> None:
    total = 400
    claims = _dispatched_celery_tasks("claims", total)

    results = run_in_processes(PROCESSES, _claim_all, claims, shared_barrier(PROCESSES))

    won = [task_id for chunk in results for task_id in chunk]
    assert sorted(won) == sorted(task_id for task_id, _ in claims), "claimed twice, or lost"
    assert sum(1 for chunk in results if chunk) > 1, "only one process ever won a claim"
    assert Task.objects.filter(scheduler_id="claims", status=TaskStatus.RUNNING).count() == total
    running_events = TaskEvent.objects.filter(to_status=TaskStatus.RUNNING)
    assert running_events.count() == total
    assert running_events.values("task_id").distinct().count() == total


def _complete_or_reap(index: int, claims: list[tuple[str, int]], travel_to: str) -> Counter[str]:
    outcome: Counter[str] = Counter()
    with time_machine.travel(travel_to, tick=False):
        # Reapers take the oldest lease first. Some completers walk the same way, racing them
        # row by row; others walk from the newest lease, so both sides always win some.
        order = claims if index % 4 == 1 else list(reversed(claims))
        for task_id, attempt in order:
            if index % 2:
                try:
                    services.task_complete(task_id=task_id, attempt=attempt, result={"by": index})
                    outcome["completed"] += 1
                except TransitionRefused:
                    outcome["refused"] += 1
            else:
                # One lease per transaction, oldest first.
                outcome["reaped"] += housekeeping.tasks_reap_expired(batch_size=1)
    return outcome


@pytest.mark.postgres
def test_task_complete__racing_the_reaper_each_attempt_ends_exactly_once() -> None:
    claims = _dispatched_celery_tasks("ends", 300)
    for task_id, attempt in claims:
        services.task_start(task_id=task_id, actor="w", attempt=attempt)
    later = (timezone.now() + timedelta(hours=2)).isoformat()  # every lease has expired

    results = run_in_processes(6, _complete_or_reap, claims, later)

    totals = sum(results, Counter())
    assert totals["completed"] + totals["reaped"] == 300
    assert totals["completed"] > 0 and totals["reaped"] > 0, "no race happened"
    for task in Task.objects.filter(scheduler_id="ends"):
        ends = list(
            TaskEvent.objects.filter(task=task, from_status=TaskStatus.RUNNING).values_list(
                "to_status", flat=True
            )
        )
        assert len(ends) == 1, f"attempt ended {len(ends)} times: {ends}"
        assert task.status == ends[0]  # demo.echo: no retry, so a reaped attempt is FAILED
        assert task.status in {TaskStatus.COMPLETED, TaskStatus.FAILED}


@pytest.mark.postgres
def test_task_complete__waits_for_a_concurrent_claim_then_completes() -> None:
    # Found in review: the completion locked the row, waited for the claim to commit, read
    # RUNNING, then re-checked that against its older snapshot (DISPATCHED) and dropped a
    # legitimate result.
    (task_id, attempt), *_ = _dispatched_celery_tasks("behind", 1)
    claim = connections.create_connection("default")
    outcome: dict[str, Any] = {}

    def complete() -> None:
        try:
            outcome["task"] = services.task_complete(
                task_id=task_id, attempt=attempt, result={"ok": 1}, actor="runner"
            )
        except Exception as exc:  # reported below, not lost in the thread
            outcome["error"] = exc
        finally:
            connections.close_all()

    try:
        with claim.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("UPDATE tasks_task SET status = 'RUNNING' WHERE id = %s", [task_id])
            completer = threading.Thread(target=complete)
            completer.start()
            _wait_until_blocked_on_a_lock(cursor, outcome)
            cursor.execute("COMMIT")
        completer.join(30)
    finally:
        claim.close()

    assert "error" not in outcome, outcome.get("error")
    assert (outcome["task"].status, outcome["task"].from_status) == ("COMPLETED", "RUNNING")
    ends = TaskEvent.objects.filter(task_id=task_id, to_status=TaskStatus.COMPLETED)
    assert list(ends.values_list("from_status", flat=True)) == ["RUNNING"]


def _wait_until_blocked_on_a_lock(cursor: Any, outcome: dict[str, Any]) -> None:
    for _ in range(300):
        assert not outcome, f"the completion did not wait: {outcome}"
        # Activity is read once per transaction, and this cursor is inside one: re-read it.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        if cursor.fetchone()[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the completion never waited for the claim's row lock")


def _hold_report_requeue_reap(index: int, scheduler_id: str, rounds: int) -> Counter[str]:
    """One process of the lease-token proof: pops tasks (each under a worker name of its own),
    reports on them with their tokens, sometimes late (after the 1 s lease ran out and the
    task may have been reaped and popped by another), cancels, requeues finished ones (which
    starts their attempts again at 0), and reaps."""
    rng = random.Random(index)
    outcome: Counter[str] = Counter()
    held: list[tuple[uuid.UUID, str, str]] = []
    for seq in range(rounds):
        action = rng.random()
        if action < 0.35:
            name = f"p{index}-{seq}"
            held += [(t.id, t.lease_token, name) for t in services.task_pop(
                scheduler_id=scheduler_id, worker=name
            )]  # fmt: skip
        elif action < 0.75 and held:
            task_id, token, name = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.3:
                time.sleep(1.1)  # late: the lease has run out
            report = services.task_complete if rng.random() < 0.3 else services.task_fail
            try:
                report(task_id=task_id, actor=name, proof=LeaseProof.holder(token))
                outcome["accepted"] += 1
            except TransitionRefused:
                outcome["refused"] += 1
        elif action < 0.8:
            active = Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.DISPATCHED)
            for task_id in active.values_list("id", flat=True)[:1]:
                with contextlib.suppress(TransitionRefused):
                    services.task_cancel(task_id=task_id, actor="operator")
                    outcome["cancelled"] += 1
        elif action < 0.92:
            finished = list(
                Task.objects.filter(
                    scheduler_id=scheduler_id, status__in=REQUEUEABLE_STATUSES
                ).values_list("id", flat=True)[:3]
            )
            for task_id in finished:
                with contextlib.suppress(TransitionRefused, DuplicateTask):
                    services.task_requeue(task_id=task_id, actor="operator")
                    outcome["requeued"] += 1
        else:
            outcome["reaped"] += housekeeping.tasks_reap_expired(actor="reaper")
        time.sleep(rng.random() * 0.01)
    return outcome


@pytest.mark.postgres
def test_lease_token__a_stale_holder_never_reports_over_a_newer_one() -> None:
    """Whatever mix of pops, late reports, requeues and reaps runs at once, every report that
    is accepted comes from the task's latest hand-out: the holder named by the newest
    DISPATCHED event before it. (The attempt alone could not prove it: a requeue resets it.)"""
    services.scheduler_create(
        id="fence", lease_seconds=1, retry_policy="fixed", retry_delay_seconds=0,
        retry_jitter=False, max_attempts=2, dead_letter=False,
    )  # fmt: skip
    for n in range(12):
        services.task_push(scheduler_id="fence", data={"n": n})

    results = run_in_processes(PROCESSES, _hold_report_requeue_reap, "fence", 120)

    totals = sum(results, Counter())
    assert totals["accepted"] > 20 and totals["refused"] > 0, totals
    assert totals["requeued"] > 5 and totals["cancelled"] > 0, totals
    holder: dict[uuid.UUID, str] = {}
    checked = 0
    for event in TaskEvent.objects.filter(task__scheduler_id="fence").order_by("id"):
        if event.to_status == TaskStatus.DISPATCHED:
            holder[event.task_id] = event.actor
        elif event.from_status in LEASED_STATUSES and event.actor.startswith("p"):
            assert event.actor == holder[event.task_id], (
                f"task {event.task_id}: {event.actor} reported over {holder[event.task_id]}"
            )
            checked += 1
    assert checked == totals["accepted"]


def _push_batches(index: int, scheduler_id: str) -> Counter[int]:
    outcomes: Counter[int] = Counter()
    for round_ in range(5):
        pushes = [{"hash": f"h{(index * 7 + round_ * 13 + n) % 60}"} for n in range(20)]
        pushes += [{"data": {"by": index, "round": round_, "n": n}} for n in range(10)]
        for outcome in batches.task_push_many(scheduler_id=scheduler_id, pushes=pushes):
            outcomes[outcome.status] += 1
    return outcomes


def test_batch_push__concurrent_batches_keep_dedup_and_the_bound() -> None:
    services.scheduler_create(id="batch", max_queue_size=200)

    results = run_in_processes(PROCESSES, _push_batches, "batch")

    totals = sum(results, Counter())
    queued = Task.objects.filter(scheduler_id="batch", status=TaskStatus.QUEUED)
    assert queued.count() == totals[201] <= 200, totals
    assert totals[429] > 0 and totals[409] > 0, totals
    hashed = queued.exclude(hash=None).values_list("hash", flat=True)
    assert len(hashed) == len(set(hashed)), "two active tasks with one hash"
    pushed = TaskEvent.objects.filter(task__scheduler_id="batch", note="pushed")
    assert pushed.count() == totals[201]
