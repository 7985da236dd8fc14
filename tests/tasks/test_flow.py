"""Flow control (DESIGN §9.4) on one process: rate limit, concurrency per key, fair share;
the same path for pops and Celery dispatch. Concurrency proofs: test_flow_concurrency.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks import dispatch, flow, services
from tasks.models import FlowHandout, Task, TaskEvent, TaskStatus
from tests.support.seed import seed_queued

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_remembered_walks() -> Iterator[None]:
    # tasks.flow remembers per queue id that a pop of one needed the walk over the values
    # (the next pops of that queue try it first); these tests reuse queue ids, so each one
    # starts without that memory and does not depend on the order the tests run in.
    # Likewise its count of hand-outs since a queue's window log was last pruned.
    flow._FULL_PICKS.clear()
    flow._SINCE_PRUNE.clear()
    yield
    flow._FULL_PICKS.clear()
    flow._SINCE_PRUNE.clear()


def _push(scheduler_id: str, count: int, **fields: Any) -> list[Task]:
    return [services.task_push(scheduler_id=scheduler_id, **fields) for _ in range(count)]


def _pop(scheduler_id: str, limit: int = 1, **options: Any) -> list[Task]:
    return services.task_pop(scheduler_id=scheduler_id, limit=limit, worker="r", **options)


def test_task_pop__rate_limit_answers_what_the_window_allows() -> None:
    services.scheduler_create(id="rated", rate_limit="5/m")
    seed_queued("rated", 20)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        assert len(_pop("rated", limit=3)) == 3
        assert len(_pop("rated", limit=100)) == 2  # 5 per minute: 2 tokens left
        assert _pop("rated", limit=100) == []
        clock.shift(timedelta(seconds=59))
        assert _pop("rated", limit=100) == []  # the first hand-out is still in the window
        clock.shift(timedelta(seconds=1, microseconds=1))
        assert len(_pop("rated", limit=100)) == 5  # both batches have left the window


def test_task_pop__rate_limit_is_per_window_not_per_pop() -> None:
    services.scheduler_create(id="rated", rate_limit="2/s")
    seed_queued("rated", 10)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        popped = [len(_pop("rated")) for _ in range(4)]
        clock.shift(timedelta(milliseconds=500))
        popped += [len(_pop("rated")) for _ in range(2)]
    assert popped == [1, 1, 0, 0, 0, 0]


def test_task_pop__long_poll_waits_for_the_next_token() -> None:
    services.scheduler_create(id="rated", rate_limit="1/s")
    seed_queued("rated", 3)
    assert len(_pop("rated")) == 1
    # The next token is due within the wait: the pop waits for it, not an empty answer.
    assert len(_pop("rated", wait=3)) == 1


def test_task_pop__concurrency_limit_skips_values_at_their_limit() -> None:
    services.scheduler_create(id="conc", concurrency_key="org.id", concurrency_limit=2)
    _push("conc", 50, data={"org": {"id": "big"}}, priority=0)
    _push("conc", 3, data={"org": {"id": "small"}}, priority=5)
    _push("conc", 1, data={}, priority=9)  # no key: its own group ("")

    first = _pop("conc", limit=10)

    values = Counter(task.concurrency_value for task in first)
    assert values == {"big": 2, "small": 2, "": 1}
    assert _pop("conc", limit=10) == []
    services.task_complete(task_id=first[0].id, result=None, attempt=1)
    assert [t.concurrency_value for t in _pop("conc", limit=10)] == [first[0].concurrency_value]


def test_task_pop__concurrency_limit_reaches_past_a_crowded_head() -> None:
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 600, data={"org": "big"}, priority=0)
    _push("conc", 2, data={"org": "late"}, priority=1)

    got = [task.data["org"] for task in _pop("conc", limit=5)]

    # The first 600 in queue order are all "big" (past the in-order stretch): the value
    # heads find "late" anyway, one per value.
    assert sorted(got) == ["big", "late"]


def test_task_pop__pops_of_one_reach_past_a_crowded_head() -> None:
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 20, data={"org": "big"}, priority=0)
    _push("conc", 2, data={"org": "late"}, priority=1)

    # The first pop takes "big"; after it, the head is all "big" at its limit (longer than
    # the in-order stretch of a pop of one): the walk over the values finds "late"; then
    # both values are at their limit.
    got = [[task.data["org"] for task in _pop("conc")] for _ in range(3)]

    assert got == [["big"], ["late"], []]


@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__pops_of_one_take_the_next_task_in_queue_order_past_a_blocked_head(
    limit: int,
) -> None:
    # A few blocked tasks at the head, then "c" (priority 1) before "b" (priority 2): a pop
    # of one takes "c", as a batch pop does; walking the values from the cursor would find
    # "b" first (its value sorts before "c").
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 5, data={"org": "a"}, priority=0)
    assert [task.data["org"] for task in _pop("conc")] == ["a"]
    _push("conc", 1, data={"org": "c"}, priority=1)
    _push("conc", 1, data={"org": "b"}, priority=2)

    got = [task.data["org"] for task in services.task_pop(scheduler_id="conc", limit=limit)]

    assert got == ["c", "b"][:limit]


def test_task_pop__fair_pops_of_one_go_round_the_values() -> None:
    services.scheduler_create(id="fair", fair_key="org")
    later = timezone.now() + timedelta(hours=1)
    for org in ("a", "b", "c"):
        _push("fair", 2, data={"org": org})
    # "d" has nothing due (more tasks than a pop of one reads past the cursor): it loses
    # its turns, and "e" after it still gets them.
    seed_queued("fair", 40, data={"org": "d"}, not_before=later)
    _push("fair", 2, data={"org": "e"})

    handed = [task.data["org"] for _ in range(11) for task in _pop("fair")]

    assert handed == ["a", "b", "c", "e", "a", "b", "c", "e"]


def test_task_pop__fair_key_gives_every_value_its_turn() -> None:
    services.scheduler_create(id="fair", fair_key="org")
    seed_queued("fair", 2000, data={"org": "huge"}, priority=0)
    for n in range(50):
        seed_queued("fair", 10, data={"org": f"small-{n:02}"}, priority=5)

    handed = [task.data["org"] for _ in range(51) for task in _pop("fair")]

    assert len(set(handed)) == 51  # every value within the first 51 hand-outs


def test_task_pop__fair_key_keeps_priority_order_within_a_value() -> None:
    services.scheduler_create(id="fair", fair_key="org")
    for priority in (5, 1, 3):
        _push("fair", 1, data={"org": "a", "p": priority}, priority=priority)
        _push("fair", 1, data={"org": "b", "p": priority}, priority=priority)

    handed = [(t.data["org"], t.priority) for t in _pop("fair", limit=6)]

    assert handed == [("a", 1), ("b", 1), ("a", 3), ("b", 3), ("a", 5), ("b", 5)]


def test_task_pop__fair_and_concurrency_together() -> None:
    services.scheduler_create(id="both", fair_key="org", concurrency_key="org", concurrency_limit=1)
    for org in ("a", "b", "c"):
        _push("both", 3, data={"org": org})

    first = _pop("both", limit=10)

    assert sorted(task.data["org"] for task in first) == ["a", "b", "c"]
    assert _pop("both", limit=10) == []


def test_scheduler_update__changed_key_restamps_queued_tasks() -> None:
    scheduler = services.scheduler_create(id="later")
    _push("later", 3, data={"org": "a"})
    _push("later", 3, data={"org": "b"})

    services.scheduler_update(scheduler=scheduler, concurrency_key="org", concurrency_limit=1)

    assert sorted(t.data["org"] for t in _pop("later", limit=10)) == ["a", "b"]


def test_task_pop__plain_queue_ignores_flow_state() -> None:
    services.scheduler_create(id="plain")
    seed_queued("plain", 5)
    assert len(_pop("plain", limit=5)) == 5
    assert not Task.objects.filter(concurrency_value__isnull=False).exists()


def test_dispatch__rate_limit_counts_dispatches(restore_handlers: None) -> None:
    services.scheduler_create(
        id="rated-celery", kind="celery", handler="demo.echo", rate_limit="3/h", paused=True
    )
    _push("rated-celery", 5, data={})
    services.scheduler_set_paused(scheduler_id="rated-celery", paused=False)

    dispatch.dispatch_scheduler("rated-celery")
    dispatch.dispatch_scheduler("rated-celery")

    counts = Counter(Task.objects.values_list("status", flat=True))
    assert counts == {TaskStatus.DISPATCHED: 3, TaskStatus.QUEUED: 2}
    assert TaskEvent.objects.filter(to_status=TaskStatus.DISPATCHED).count() == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_limit", "fast"),
        ("rate_limit", "10/d"),
        ("rate_limit", "0/s"),
        ("concurrency_key", "org..id"),
        ("fair_key", "a b"),
        ("concurrency_limit", 0),
    ],
)
def test_scheduler_api__bad_flow_setting_is_a_400_naming_the_field(
    operator_client: Any, field: str, value: Any
) -> None:
    response = operator_client.post("/api/schedulers/", {"id": "q", field: value}, format="json")
    assert response.status_code == 400
    assert field in response.json()


def test_scheduler_api__flow_settings_round_trip(operator_client: Any) -> None:
    body = {"id": "q", "rate_limit": "600/m", "concurrency_key": "org.id", "fair_key": "org.id"}
    created = operator_client.post("/api/schedulers/", body, format="json")
    assert created.status_code == 201, created.json()
    changed = operator_client.patch(
        "/api/schedulers/q/", {"concurrency_limit": 4, "rate_limit": ""}, format="json"
    )
    assert changed.json()["concurrency_limit"] == 4 and changed.json()["rate_limit"] == ""


def test_scheduler_command__flow_options() -> None:
    call_command(
        "scheduler", "create", "q", "--rate-limit", "100/s", "--concurrency-key", "org",
        "--concurrency-limit", "3", "--fair-key", "org", stdout=StringIO(),
    )  # fmt: skip
    scheduler = services.get_scheduler("q")
    assert (scheduler.rate_limit, scheduler.concurrency_key) == ("100/s", "org")
    assert (scheduler.concurrency_limit, scheduler.fair_key) == (3, "org")


def test_task_pop__a_queue_whose_flow_settings_changed_pops_by_the_new_ones() -> None:
    # PostgreSQL: the process remembers the queue from its first pop and tries its one
    # statement first; the statement finds the settings changed and the pop reads the row.
    scheduler = services.scheduler_create(id="changes", rate_limit="1000/s")
    seed_queued("changes", 6, data={"org": "a"})
    assert len(_pop("changes")) == 1
    services.scheduler_update(scheduler=scheduler, rate_limit="", concurrency_key="org")
    assert len(_pop("changes", limit=5)) == 0  # "a" already has its one active task
    services.scheduler_update(scheduler=scheduler, concurrency_limit=3)
    assert len(_pop("changes", limit=5)) == 2
    services.scheduler_update(scheduler=scheduler, paused=True)
    assert _pop("changes", limit=5) == []


# The one-statement hand-out's clock (PostgreSQL): the caller's, moved on to the last hand-out
# in the window log or the last end of an attempt it may have counted, so that the log stays
# in time order and the events show every limit held (docs/flow-control.md).
@pytest.mark.postgres
def test_task_pop__a_clock_behind_the_window_log_hands_out_at_the_logs_time() -> None:
    services.scheduler_create(id="rated", rate_limit="100/s")
    seed_queued("rated", 3)
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        [first] = _pop("rated")
    with time_machine.travel(start - timedelta(seconds=5), tick=False):
        [second] = _pop("rated")

    assert second.modified_at == first.modified_at == start


# The one-statement hand-out deletes the window log's old rows on one run in PRUNE_EVERY: the
# log stays bounded, and the rows it keeps a while past the window are never counted.
@pytest.mark.postgres
def test_task_pop__the_window_log_is_pruned_one_hand_out_in_prune_every() -> None:
    services.scheduler_create(id="rated", rate_limit="1/s")
    pops = 2 * flow.PRUNE_EVERY + 5
    seed_queued("rated", pops + 2)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        for _ in range(pops):
            assert len(_pop("rated", limit=5)) == 1  # every earlier row is out of the window
            clock.shift(timedelta(seconds=2))
        rows = FlowHandout.objects.filter(scheduler_id="rated").count()
        assert 1 <= rows <= flow.PRUNE_EVERY  # the hand-outs since the last prune
        assert len(_pop("rated", limit=5)) == 1
        assert _pop("rated", limit=5) == []  # the newest row still counts


@pytest.mark.postgres
def test_task_pop__a_clock_behind_an_end_it_counted_hands_out_after_it() -> None:
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 2, data={"org": "a"})
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        [first] = _pop("conc")
        services.task_complete(task_id=first.id, result=None, attempt=1)
    with time_machine.travel(start - timedelta(seconds=5), tick=False):
        [second] = _pop("conc")

    ended = TaskEvent.objects.get(task_id=first.id, to_status=TaskStatus.COMPLETED).at
    assert second.modified_at == ended == start


# A pop of one tries the lean single-task pick first and, when a crowded head makes it answer
# "more", the pick that walks the values (tasks.flow._handout): a statement each. A queue whose
# pops walked starts with the walking pick, as long as its pops keep walking.
@pytest.mark.postgres
def test_task_pop__a_crowded_queue_keeps_to_the_walking_pick_while_its_pops_walk() -> None:
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 30, data={"org": "big"}, priority=0)
    for n in range(2 * flow.FULL_PICK_RUN + 4):
        _push("conc", 1, data={"org": f"small-{n:02}"}, priority=5)
    assert [task.data["org"] for task in _pop("conc")] == ["big"]  # now the head is crowded

    statements = []
    for _ in range(2 * flow.FULL_PICK_RUN + 2):
        with CaptureQueriesContext(connection) as queries:
            [task] = _pop("conc")
        assert task.data["org"].startswith("small")
        statements.append(len(queries))

    # The first crowded pop runs both picks; every later one only the walking pick, also
    # past FULL_PICK_RUN pops (each walked, so the memory was renewed).
    assert statements == [2] + [1] * (2 * flow.FULL_PICK_RUN + 1)


@pytest.mark.postgres
def test_task_pop__a_queue_whose_head_cleared_goes_back_to_the_lean_pick() -> None:
    services.scheduler_create(id="conc", concurrency_key="org", concurrency_limit=1)
    seed_queued("conc", 20, data={"org": "big"}, priority=0)
    for n in range(flow.FULL_PICK_RUN + 2):
        _push("conc", 1, data={"org": f"small-{n:02}"}, priority=5)
    assert [task.data["org"] for task in _pop("conc")] == ["big"]
    with CaptureQueriesContext(connection) as crowded:
        _pop("conc")  # the lean pick's "more", then the walking pick
    queued_big = Task.objects.filter(scheduler_id="conc", status=TaskStatus.QUEUED, data__org="big")
    for task in queued_big:
        services.task_cancel(task_id=task.id)
    # The head has room again: these pops take it in queue order without walking, and
    # after FULL_PICK_RUN of them the queue's memory of the walk has run out.
    assert (
        len([task for _ in range(flow.FULL_PICK_RUN) for task in _pop("conc")])
        == flow.FULL_PICK_RUN
    )
    seed_queued("conc", 20, data={"org": "big2"}, priority=0)
    assert [task.data["org"] for task in _pop("conc")] == ["big2"]
    with CaptureQueriesContext(connection) as crowded_again:
        [task] = _pop("conc")

    assert task.data["org"].startswith("small")
    assert (len(crowded), len(crowded_again)) == (2, 2)


@pytest.mark.parametrize("key", ["concurrency_key", "fair_key"])
def test_task_requeue__a_task_that_ended_before_a_key_change_gets_the_new_keys_value(
    key: str,
) -> None:
    """The restamp passes over finished tasks; their requeue stamps them from the keys now."""
    scheduler = services.scheduler_create(id="rq", concurrency_limit=1, **{key: "org"})
    old = services.task_push(scheduler_id="rq", data={"org": "a", "team": "T"})
    services.task_cancel(task_id=old.id)
    services.scheduler_update(scheduler=scheduler, **{key: "team"})
    services.task_push(scheduler_id="rq", data={"org": "b", "team": "T"})

    requeued = services.task_requeue(task_id=old.id)

    column = "concurrency_value" if key == "concurrency_key" else "fair_value"
    assert getattr(Task.objects.get(id=requeued.id), column) == "T"
    if key == "concurrency_key":
        assert len(_pop("rq", limit=2)) == 1  # both are "T", whose limit is 1
