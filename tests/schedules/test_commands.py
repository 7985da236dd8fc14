"""manage.py schedule / orchestrate / setup_periodic_tasks."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from time_machine import TimeMachineFixture

from scheduler_site.periodic import system_jobs
from schedules.management.commands.schedule import Command as ScheduleCommand
from schedules.models import Schedule, ScheduleStatus
from tasks.models import Scheduler, Task, TaskStatus
from tests.schedules.helpers import T0

pytestmark = pytest.mark.django_db

Make = Callable[..., Schedule]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


# --- schedule ----------------------------------------------------------------------------------


def test_schedule_create__cron_interval_and_one_off(
    clock: TimeMachineFixture, scheduler: Scheduler
) -> None:
    out = run(
        "schedule", "create", "--scheduler", "boefje", "--cron", "0 9 * * *",
        "--timezone", "Europe/Amsterdam", "--data", '{"org": "acme"}', "--priority", "3",
        "--hash", "acme",
    )  # fmt: skip
    cron = Schedule.objects.get(hash="acme")
    assert f"created {cron.id}: ACTIVE, next run 2030-01-02T08:00:00Z; At 09:00" in out
    assert (cron.cron, cron.timezone, cron.data, cron.priority) == (
        "0 9 * * *",
        "Europe/Amsterdam",
        {"org": "acme"},
        3,
    )
    assert cron.deadline_at == T0.replace(day=2, hour=8, minute=0)

    run(
        "schedule", "create", "--scheduler", "boefje", "--interval-seconds", "60",
        "--hash", "every",
    )  # fmt: skip
    assert Schedule.objects.get(hash="every").deadline_at == T0

    run(
        "schedule", "create", "--scheduler", "boefje", "--run-at", "2030-01-01T12:00:00+01:00",
        "--hash", "once",
    )  # fmt: skip
    once = Schedule.objects.get(hash="once")
    assert (once.run_at, once.deadline_at) == (T0.replace(hour=11, minute=0),) * 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cron", "61 * * * *"], "cron"),
        (["--cron", "* * * *"], "cron"),
        (["--cron", "* * * * *", "--interval-seconds", "60"], "cron"),
        ([], "cron"),
        (["--interval-seconds", "60", "--timezone", "Mars/Base"], "--timezone"),
        (["--interval-seconds", "60", "--data", "[1]"], "--data"),
        (["--interval-seconds", "sixty"], "is not an integer"),
        (["--interval-seconds", "0"], "--interval-seconds"),
        (["--run-at", "tomorrow"], "ISO 8601"),
        (["--run-at", "2030-01-01T12:00:00"], "offset"),  # naive: refused
    ],
)
def test_schedule_create__bad_input_is_a_command_error(
    scheduler: Scheduler, args: list[str], words: str
) -> None:
    with pytest.raises(CommandError) as caught:
        run("schedule", "create", "--scheduler", "boefje", *args)

    assert words in str(caught.value)
    assert not Schedule.objects.exists()


def test_schedule_create__unknown_scheduler(db: None) -> None:
    with pytest.raises(CommandError, match="--scheduler: Object with id=nope does not exist"):
        run("schedule", "create", "--scheduler", "nope", "--interval-seconds", "60")


def test_schedule_list__filters(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    due = make_schedule(interval_seconds=60)
    later = make_schedule(cron="0 12 * * *")
    paused = make_schedule(scheduler_id="other", interval_seconds=60)
    run("schedule", "pause", str(paused.id))

    listed = run("schedule", "list")
    assert all(str(s.id) in listed for s in (due, later, paused))
    assert "every 60s" in listed and "0 12 * * *" in listed

    assert str(paused.id) not in run("schedule", "list", "--scheduler", "boefje")
    only_paused = run("schedule", "list", "--status", "PAUSED")
    assert str(paused.id) in only_paused and str(due.id) not in only_paused
    only_due = run("schedule", "list", "--due")
    assert str(due.id) in only_due and str(later.id) not in only_due
    assert len(run("schedule", "list", "--limit", "1").strip().splitlines()) == 3  # head, rule, 1
    assert [s["id"] for s in json.loads(run("schedule", "list", "--due", "--json"))] == [
        str(due.id)
    ]


def test_schedule_pause_resume_trigger_delete(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")
    sid = str(schedule.id)

    assert f"{sid}: PAUSED" in run("schedule", "pause", sid)
    assert Schedule.objects.get(id=sid).status == ScheduleStatus.PAUSED
    clock.move_to(T0.replace(hour=15, minute=30), tick=False)
    assert "ACTIVE, next run 2030-01-01T16:00:00Z" in run("schedule", "resume", sid)

    out = run("schedule", "trigger", sid)
    task = Task.objects.get(schedule_id=sid)
    assert f"task {task.id} QUEUED" in out
    with pytest.raises(CommandError, match="409"):
        run("schedule", "trigger", sid)
    assert Task.objects.count() == 1

    assert f"deleted {sid}" in run("schedule", "delete", sid)
    assert not Schedule.objects.exists()
    assert Task.objects.get(id=task.id).schedule_id is None


@pytest.mark.parametrize("action", ["pause", "resume", "trigger", "delete"])
def test_schedule_actions__unknown_id_is_a_command_error(db: None, action: str) -> None:
    with pytest.raises(CommandError, match="404"):
        run("schedule", action, str(uuid.uuid4()))


def test_schedule_help__explains_each_action() -> None:
    text = ScheduleCommand().create_parser("manage.py", "schedule").format_help()

    for action in ("list", "create", "pause", "resume", "trigger", "delete"):
        assert action in text
    assert "next run recomputed from now" in text


# --- orchestrate -------------------------------------------------------------------------------


def test_orchestrate_once__creates_tasks_for_due_schedules(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    due = [make_schedule(interval_seconds=60) for _ in range(2)]
    make_schedule(scheduler_id="other", interval_seconds=60)
    not_due = make_schedule(cron="0 12 * * *")

    out = run("orchestrate", "--once")

    assert "tick: 3 tasks created (boefje: 2, other: 1)" in out
    assert {t.schedule_id for t in Task.objects.filter(scheduler_id="boefje")} == {
        s.id for s in due
    }
    assert not Task.objects.filter(schedule=not_due).exists()
    assert set(Task.objects.values_list("status", flat=True)) == {TaskStatus.QUEUED}
    assert "tick: 0 tasks created" in run("orchestrate", "--once")


def test_orchestrate_once__one_scheduler_and_small_batches(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    for _ in range(5):
        make_schedule(interval_seconds=60)
    make_schedule(scheduler_id="other", interval_seconds=60)

    out = run("orchestrate", "--once", "--scheduler", "boefje", "--batch-size", "2")

    assert "tick: 5 tasks created (boefje: 5)" in out
    assert not Task.objects.filter(scheduler_id="other").exists()


# --- setup_periodic_tasks ----------------------------------------------------------------------


def _system_tasks() -> dict[str, PeriodicTask]:
    names = [job.name for job in system_jobs()]
    return {task.name: task for task in PeriodicTask.objects.filter(name__in=names)}


def test_setup_periodic_tasks__idempotent(db: None) -> None:
    first = run("setup_periodic_tasks")
    rows = _system_tasks()
    second = run("setup_periodic_tasks")

    assert first.count("created") == len(system_jobs()) == len(rows)
    assert second.count("unchanged") == len(system_jobs())
    assert "created" not in second
    assert {name: task.id for name, task in _system_tasks().items()} == {
        name: task.id for name, task in rows.items()
    }
    tick = rows["scheduler: orchestrator tick"]
    assert tick.task == "schedules.orchestrate"
    assert tick.interval is not None and tick.enabled
    assert json.loads(tick.kwargs) == {}
    assert rows["scheduler: prune finished tasks"].crontab is not None
    assert {task.queue for task in rows.values()} == {settings.CELERY_SYSTEM_QUEUE} == {"system"}


def test_setup_periodic_tasks__keeps_an_operators_disable(db: None) -> None:
    run("setup_periodic_tasks")
    tick = PeriodicTask.objects.get(name="scheduler: orchestrator tick")
    tick.enabled = False
    tick.save()

    run("setup_periodic_tasks")
    assert PeriodicTask.objects.get(id=tick.id).enabled is False

    with override_settings(ORCHESTRATOR_TICK_SECONDS=42):
        out = run("setup_periodic_tasks")
    updated = PeriodicTask.objects.get(id=tick.id)
    assert "updated   scheduler: orchestrator tick" in out
    assert updated.interval == IntervalSchedule.objects.get(every=42, period="seconds")
    assert updated.enabled is False
    assert PeriodicTask.objects.filter(name=tick.name).count() == 1


def test_setup_demo__queues_of_plain_celery_tasks_and_django_tasks(tmp_path: Path) -> None:
    call_command("setup_demo", token_file=str(tmp_path / "token"), stdout=StringIO())
    call_command("setup_demo", token_file=str(tmp_path / "token"), stdout=StringIO())

    handlers = dict(Scheduler.objects.values_list("id", "handler"))
    assert handlers["demo-celery-add"] == "celery:demo_app.tasks.add"
    assert handlers["demo-celery-flaky"] == "celery:demo_app.tasks.flaky"
    assert handlers["reports"] == "django_tasks.call"
    named = dict(Schedule.objects.values_list("name", "scheduler_id"))
    assert named["add-every-20s"] == "demo-celery-add"
    assert named["summary-every-30s"] == "reports"
    assert Schedule.objects.filter(name="add-every-20s").count() == 1  # idempotent
