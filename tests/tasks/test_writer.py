"""One writer of task status: the ORM shortcuts are refused outside it, every SQL statement
that writes a status lives in the tasks/queue package, and each one's move is in the
transition table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks import queue
from tasks.models import (
    ALLOWED_TRANSITIONS,
    StatusWriteRefused,
    Task,
    TaskStatus,
    is_allowed_transition,
)
from tests.support.seed import seed_queued

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["tasks", "schedules", "pilots", "scheduler_site"]
SET_STATUS = re.compile(r"SET\s+status\s*=\s*'(\w+)'", re.I)
WHERE_STATUS = re.compile(r"status\s*(?:=\s*'(\w+)'|IN\s*\(([^)]*)\))", re.I)

pytestmark = pytest.mark.django_db


def test_orm__update_of_status_outside_the_writer_is_refused(scheduler: object) -> None:
    seed_queued("boefje", 2)
    with pytest.raises(StatusWriteRefused):
        Task.objects.filter(scheduler_id="boefje").update(status=TaskStatus.COMPLETED)
    assert Task.objects.filter(status=TaskStatus.QUEUED).count() == 2
    assert Task.objects.filter(scheduler_id="boefje").update(priority=3) == 2  # not status


def test_orm__bulk_writes_outside_the_writer_are_refused(scheduler: object) -> None:
    with pytest.raises(StatusWriteRefused):
        Task.objects.bulk_create([Task(scheduler_id="boefje")])
    seed_queued("boefje", 1)
    task = Task.objects.get()
    task.status = TaskStatus.DEAD
    with pytest.raises(StatusWriteRefused):
        Task.objects.bulk_update([task], ["status"])
    assert Task.objects.get().status == TaskStatus.QUEUED


def test_queue__a_move_outside_the_table_is_refused_by_the_queue_itself(
    scheduler: object,
) -> None:
    seed_queued("boefje", 1)
    task = Task.objects.get()
    with pytest.raises(ValueError, match="ALLOWED_TRANSITIONS"):
        queue.cas_update(
            task_ids=[task.id], expected=TaskStatus.QUEUED, values={"status": TaskStatus.RUNNING}
        )
    with pytest.raises(ValueError, match="QUEUED tasks only"):
        queue.insert_queued(
            [Task(scheduler_id="boefje", status="DEAD")], actor="", note="", at=task.created_at
        )


def _sql_modules() -> list[Path]:
    return [
        path
        for app in PRODUCT
        for path in (ROOT / app).rglob("*.py")
        if "migrations" not in path.parts
    ]


def test_sql__only_the_queue_module_writes_task_status_in_sql() -> None:
    writers = [
        str(path.relative_to(ROOT))
        for path in _sql_modules()
        if SET_STATUS.search(path.read_text()) or re.search(r"SET status = '", path.read_text())
    ]
    assert writers and all(writer.startswith("tasks/queue/") for writer in writers), writers
    source = "".join(path.read_text() for path in sorted((ROOT / "tasks/queue").glob("*.py")))
    assert len(SET_STATUS.findall(source)) == len(queue.STATUS_STATEMENTS), (
        "a status-writing statement of the tasks/queue package is missing from STATUS_STATEMENTS"
    )


@pytest.mark.parametrize("name", sorted(queue.STATUS_STATEMENTS))
def test_sql__each_status_statement_moves_only_along_the_table(name: str) -> None:
    sql = queue.STATUS_STATEMENTS[name]()
    # The UPDATE statement, not a row lock (`FOR UPDATE`) of a CTE before it.
    update = sql[re.search(r"(?<!FOR )\bUPDATE\b", sql, re.I).start() :]
    [to_status] = SET_STATUS.findall(update)
    # The UPDATE's own WHERE: up to its RETURNING (later CTEs read other rows' statuses).
    where = update[update.upper().index("WHERE") : update.upper().index("RETURNING")]
    from_statuses = set()
    for equal, listed in WHERE_STATUS.findall(where):
        from_statuses |= {equal} if equal else set(re.findall(r"'(\w+)'", listed))
    assert from_statuses, f"{name}: no expected status in its WHERE: not a compare-and-swap"
    for from_status in from_statuses:
        assert is_allowed_transition(from_status, to_status), (
            f"{name}: {from_status} -> {to_status}"
        )
    assert set(ALLOWED_TRANSITIONS) >= from_statuses | {to_status}
