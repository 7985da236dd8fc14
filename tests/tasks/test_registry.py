"""Handlers registered by name with their policy (DESIGN 4.5): register and look up, the error
that names the known ones, a celery scheduler naming an unknown handler refused everywhere,
and the cancellation check a handler calls."""

from __future__ import annotations

import uuid

import pytest
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from tasks import services
from tasks.exceptions import QueueError
from tasks.locks import MutexLock
from tasks.models import Scheduler
from tasks.registry import (
    HANDLERS,
    TaskCancelled,
    TaskContext,
    UnknownHandler,
    get_handler,
    register,
)
from tasks.retry import RetrySpec
from tests.tasks.helpers import snapshot

pytestmark = pytest.mark.usefixtures("restore_handlers")


def _context(**fields: object) -> TaskContext:
    defaults: dict[str, object] = {
        "task_id": uuid.UUID(int=1),
        "scheduler_id": "q",
        "data": {},
        "attempt": 1,
    }
    return TaskContext(**{**defaults, **fields})  # type: ignore[arg-type]


# --- register / get_handler ------------------------------------------------------------------


def test_register__handler_is_found_by_name_with_its_policy() -> None:
    spec = RetrySpec(policy="fixed", max_attempts=5, delay_seconds=2, jitter=False)

    @register(
        "test.double",
        retry=spec,
        locks=lambda data: [MutexLock("ce", data["ce"])],
        soft_time_limit=5,
        time_limit=10,
    )
    def double(ctx: TaskContext) -> int:
        return ctx.data["n"] * 2

    handler = get_handler("test.double")

    assert handler.name == "test.double"
    assert handler.func is double
    assert handler.func(_context(data={"n": 21})) == 42
    assert handler.retry == spec
    assert (handler.soft_time_limit, handler.time_limit) == (5, 10)
    assert handler.locks_for({"ce": "ce-1"}) == [MutexLock("ce", "ce-1")]


def test_register__defaults_are_the_default_retry_spec_and_no_locks() -> None:
    @register("test.plain")
    def plain(ctx: TaskContext) -> None:
        return None

    handler = get_handler("test.plain")

    assert handler.retry == RetrySpec()
    assert handler.locks_for({"anything": 1}) == []
    assert (handler.soft_time_limit, handler.time_limit) == (None, None)


def test_register__same_name_again_replaces_the_handler() -> None:
    register("test.twice")(lambda ctx: "first")
    register("test.twice")(lambda ctx: "second")

    assert get_handler("test.twice").func(_context()) == "second"


def test_register__demo_handlers_are_registered_when_django_starts() -> None:
    assert {"demo.echo", "demo.flaky", "demo.sleep", "demo.locked"} <= set(HANDLERS)
    sleep = get_handler("demo.sleep")
    assert (sleep.retry.policy, sleep.retry.max_attempts, sleep.retry.delay_seconds) == (
        "fixed",
        3,
        1,
    )
    assert get_handler("demo.locked").locks_for({"key": "k"}) == [MutexLock("demo", "k")]


def test_get_handler__unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownHandler) as raised:
        get_handler("demo.nope")

    message = raised.value.message
    assert "'demo.nope' is not registered" in message
    assert "known: " in message
    for name in ("demo.echo", "demo.flaky", "demo.locked", "demo.sleep"):
        assert name in message
    assert isinstance(raised.value, QueueError) and raised.value.http_status == 400


def test_get_handler__unknown_with_none_registered_says_none() -> None:
    HANDLERS.clear()

    with pytest.raises(UnknownHandler, match=r"known: none"):
        get_handler("demo.echo")


def test_get_handler__known_names_are_sorted() -> None:
    HANDLERS.clear()
    register("z.last")(lambda ctx: None)
    register("a.first")(lambda ctx: None)

    with pytest.raises(UnknownHandler, match=r"\(known: a\.first, z\.last\)"):
        get_handler("m.middle")


# --- schedulers naming a handler -------------------------------------------------------------


@pytest.mark.django_db
def test_scheduler_full_clean__unregistered_handler_is_refused() -> None:
    scheduler = Scheduler(id="ghost", kind="celery", handler="demo.ghost")

    with pytest.raises(ValidationError) as raised:
        scheduler.full_clean()

    assert set(raised.value.message_dict) == {"handler"}
    [message] = raised.value.message_dict["handler"]
    assert "'demo.ghost' is not registered" in message and "demo.echo" in message


@pytest.mark.django_db
def test_scheduler_create__unregistered_handler_is_refused_and_nothing_saved() -> None:
    with pytest.raises(ValidationError) as raised:
        services.scheduler_create(id="ghost", kind="celery", handler="demo.ghost")

    assert "demo.ghost" in raised.value.message_dict["handler"][0]
    assert not Scheduler.objects.filter(id="ghost").exists()


@pytest.mark.django_db
def test_scheduler_create__pull_scheduler_naming_an_unknown_handler_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"demo\.ghost"):
        services.scheduler_create(id="ghost", kind="pull", handler="demo.ghost")


@pytest.mark.django_db
def test_scheduler_create__celery_without_handler_is_refused() -> None:
    with pytest.raises(ValidationError) as raised:
        services.scheduler_create(id="nohandler", kind="celery")

    assert raised.value.message_dict["handler"] == ["A celery scheduler needs a handler."]


@pytest.mark.django_db
def test_scheduler_create__registered_handler_is_accepted() -> None:
    register("test.fresh")(lambda ctx: None)

    scheduler = services.scheduler_create(id="fresh", kind="celery", handler="test.fresh")

    assert Scheduler.objects.get(id="fresh").handler == scheduler.handler == "test.fresh"


@pytest.mark.django_db
def test_scheduler_update__to_an_unregistered_handler_is_refused() -> None:
    scheduler = services.scheduler_create(id="echo", kind="celery", handler="demo.echo")

    with pytest.raises(ValidationError, match=r"demo\.ghost"):
        services.scheduler_update(scheduler=scheduler, handler="demo.ghost")

    assert Scheduler.objects.get(id="echo").handler == "demo.echo"


@pytest.mark.django_db
def test_api_scheduler_create__unregistered_handler_is_400_naming_it(
    operator_client: APIClient,
) -> None:
    before = snapshot()

    response = operator_client.post(
        "/api/schedulers/",
        {"id": "ghost", "kind": "celery", "handler": "demo.ghost"},
        format="json",
    )

    assert response.status_code == 400
    [message] = response.json()["handler"]
    assert "'demo.ghost' is not registered" in message and "demo.echo" in message
    assert snapshot() == before


@pytest.mark.django_db
def test_api_scheduler_update__unregistered_handler_is_400_naming_it(
    operator_client: APIClient,
) -> None:
    services.scheduler_create(id="echo", kind="celery", handler="demo.echo")
    before = snapshot()

    response = operator_client.patch(
        "/api/schedulers/echo/", {"handler": "demo.ghost"}, format="json"
    )

    assert response.status_code == 400
    assert "demo.ghost" in response.json()["handler"][0]
    assert snapshot() == before


@pytest.mark.django_db
def test_api_scheduler_create__registered_handler_is_201(operator_client: APIClient) -> None:
    response = operator_client.post(
        "/api/schedulers/", {"id": "echo", "kind": "celery", "handler": "demo.echo"}, format="json"
    )

    assert response.status_code == 201, response.content
    assert response.json()["handler"] == "demo.echo"
    assert Scheduler.objects.get(id="echo").kind == "celery"


# --- TaskContext.check_cancelled -------------------------------------------------------------


def test_task_context__check_cancelled_passes_by_default() -> None:
    _context().check_cancelled()


def test_task_context__check_cancelled_raises_once_cancel_is_requested() -> None:
    flag = {"cancelled": False}
    task_id = uuid.uuid4()
    ctx = _context(task_id=task_id, is_cancelled=lambda: flag["cancelled"])

    ctx.check_cancelled()
    flag["cancelled"] = True
    with pytest.raises(TaskCancelled) as raised:
        ctx.check_cancelled()

    assert str(task_id) in str(raised.value)
    assert not issubclass(TaskCancelled, QueueError)  # a handler's signal, not an API error


def test_task_context__repr_leaves_out_the_callback() -> None:
    assert "is_cancelled" not in repr(_context())
