"""Which object a reference typed at a shell names: a full id, or a unique prefix of it
(as git takes a commit), for tasks and schedules."""

from __future__ import annotations

import re
import uuid
from typing import TypeVar

from django.db.models import Model, QuerySet

from tasks.exceptions import InvalidRequest, TaskNotFound
from tasks.models import Task

M = TypeVar("M", bound=Model)
MIN_PREFIX = 4  # shorter ones name half the table
_HEX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},32}}")
SHOWN_CANDIDATES = 5


def as_prefix(ref: str) -> str | None:
    """The hex digits of a UUID prefix (dashes dropped, any case), or None if `ref` is not
    one."""
    digits = ref.replace("-", "").lower()
    return digits if _HEX.fullmatch(digits) else None


def by_id_prefix(queryset: QuerySet[M], prefix: str, *, noun: str) -> M | None:
    """The one row whose UUID id starts with `prefix` (hex digits); None for no match; an
    InvalidRequest naming the candidates for several. A range of the primary key, so an index
    scan on both databases (PostgreSQL compares uuids as bytes, SQLite as hex text: the same
    order as the digits), not a LIKE over every row."""
    low = uuid.UUID(prefix.ljust(32, "0"))
    high = uuid.UUID(prefix.ljust(32, "f"))
    rows = list(queryset.filter(id__gte=low, id__lte=high).order_by("id")[: SHOWN_CANDIDATES + 1])
    if not rows:
        return None
    if len(rows) > 1:
        shown = ", ".join(str(row.pk) for row in rows[:SHOWN_CANDIDATES])
        more = ", …" if len(rows) > SHOWN_CANDIDATES else ""
        raise InvalidRequest(
            "id", f"{prefix!r} is the start of several {noun} ids ({shown}{more}); give more."
        )
    return rows[0]


def find_task(ref: str, *, queryset: QuerySet[Task] | None = None) -> Task:
    """The task `ref` names: its id, or a unique prefix of it (at least 4 hex digits)."""
    tasks = Task.objects.all() if queryset is None else queryset
    try:
        task_id = uuid.UUID(ref)
    except ValueError:
        prefix = as_prefix(ref)
        if prefix is None:
            raise InvalidRequest(
                "id", f"{ref!r} is neither a task id nor {MIN_PREFIX}+ hex digits of one."
            ) from None
        found = by_id_prefix(tasks, prefix, noun="task")
        if found is None:
            raise TaskNotFound(f"No task id starts with {ref!r}.") from None
        return found
    task = tasks.filter(id=task_id).first()
    if task is None:
        raise TaskNotFound(f"Task {task_id} does not exist.")
    return task
