"""A task named at a shell by its id or a unique prefix of it (issue 13, part 5)."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks.exceptions import InvalidRequest, TaskNotFound
from tasks.models import Scheduler, Task
from tasks.references import find_task

pytestmark = pytest.mark.django_db

A = uuid.UUID("abcd1234-0000-4000-8000-000000000001")
B = uuid.UUID("abcd1299-0000-4000-8000-000000000002")
C = uuid.UUID("abce0000-0000-4000-8000-000000000003")


@pytest.fixture
def three(scheduler: Scheduler) -> list[Task]:
    # Rows written directly: the ids must share a prefix, which uuid4 never arranges.
    return [Task.objects.create(id=task_id, scheduler=scheduler) for task_id in (A, B, C)]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (str(A), A),
        ("abcd1234", A),
        ("ABCD-1299", B),  # any case; dashes as in the id or not
        ("abce", C),
        (C.hex, C),
    ],
)
def test_find_task__id_or_unique_prefix(three: list[Task], ref: str, expected: uuid.UUID) -> None:
    assert find_task(ref).id == expected


def test_find_task__an_ambiguous_prefix_names_the_candidates(three: list[Task]) -> None:
    with pytest.raises(InvalidRequest) as raised:
        find_task("abcd")
    assert raised.value.message == (
        f"id: 'abcd' is the start of several task ids ({A}, {B}); give more."
    )


@pytest.mark.parametrize(
    ("ref", "error", "text"),
    [
        ("abcf", TaskNotFound, "No task id starts with 'abcf'."),
        ("abc", InvalidRequest, "neither a task id nor 4+ hex digits"),  # too short
        ("xyz12345", InvalidRequest, "neither a task id nor 4+ hex digits"),
        (str(uuid.UUID(int=7)), TaskNotFound, "does not exist"),
    ],
)
def test_find_task__no_match(three: list[Task], ref: str, error: type, text: str) -> None:
    with pytest.raises(error, match=text.replace("+", r"\+")):
        find_task(ref)


def test_task_command__ambiguous_prefix_exits_non_zero_naming_both(three: list[Task]) -> None:
    with pytest.raises(CommandError) as raised:
        call_command("task", "cancel", "abcd12", stdout=StringIO())
    assert str(A) in str(raised.value) and str(B) in str(raised.value)
    assert set(Task.objects.values_list("status", flat=True)) == {"QUEUED"}

    call_command("task", "cancel", "abcd123", stdout=StringIO())
    assert Task.objects.get(id=A).status == "CANCELLED"
