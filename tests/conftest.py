from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection
from rest_framework.test import APIClient

from tasks import accounts, dispatch, services, wakeups
from tasks.models import Scheduler, Task
from tasks.roles import OPERATORS, RUNNERS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if engine.endswith("postgresql"):
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL; runs in the PostgreSQL leg of make test")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _remove_test_broker_folder() -> Iterator[None]:
    yield
    from django.conf import settings

    shutil.rmtree(settings.CELERY_BROKER_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_dispatch_hints() -> None:
    """Each test starts with no queue remembered as flow-controlled (tasks.dispatch): test
    databases reuse queue ids, with other settings."""
    dispatch._FLOW_QUEUES.clear()


@pytest.fixture(autouse=True)
def _fresh_push_schedulers() -> None:
    """Each test starts with no scheduler row kept by an earlier push (tasks.services): a kept
    row is re-checked by the push, but a stale one costs a statement, which would make query
    counts depend on the order of the tests."""
    services._PUSH_SCHEDULERS.clear()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's, and before it drops the test database: close the long-poll listener
    (tasks.wakeups), whose LISTEN connection would keep the database in use."""
    yield
    wakeups.stop_listener()


@pytest.fixture
def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def _user_in(role: str, username: str) -> User:
    user = User.objects.create_user(username=username)
    user.groups.add(Group.objects.get(name=role))
    return user


def _token_client(user: User) -> APIClient:
    client = APIClient()
    _token, key = accounts.token_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


@pytest.fixture
def operator(db: None) -> User:
    return _user_in(OPERATORS, "op")


@pytest.fixture
def runner(db: None) -> User:
    return _user_in(RUNNERS, "runner")


@pytest.fixture
def operator_client(operator: User) -> APIClient:
    return _token_client(operator)


@pytest.fixture
def runner_client(runner: User) -> APIClient:
    return _token_client(runner)


@pytest.fixture
def anon_client() -> APIClient:
    return APIClient()


@pytest.fixture
def make_scheduler(db: None) -> Callable[..., Scheduler]:
    def make(scheduler_id: str = "boefje", **fields: Any) -> Scheduler:
        return services.scheduler_create(id=scheduler_id, **fields)

    return make


@pytest.fixture
def scheduler(make_scheduler: Callable[..., Scheduler]) -> Scheduler:
    return make_scheduler("boefje", retry_jitter=False)


@pytest.fixture
def push(scheduler: Scheduler) -> Callable[..., Task]:
    def push_task(**kwargs: Any) -> Task:
        kwargs.setdefault("scheduler_id", scheduler.id)
        return services.task_push(**kwargs)

    return push_task
