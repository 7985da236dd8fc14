"""Fixtures that start real Celery workers, beat and gunicorn (tests/support/processes.py)
against the real test database and a real broker: the filesystem transport with SQLite,
Redis or RabbitMQ with PostgreSQL. Nothing here is eager or mocked."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.support.processes import (  # noqa: F401 (re-exported for the tests that import them)
    ROOT,
    BeatProcess,
    ServerProcess,
    WorkerProcess,
    database_url,
    free_port,
    process_env,
    purge_broker,
    restart_broker,
    restart_redis,
)
from tests.support.waiting import beat, wait_for  # noqa: F401 (re-exported)


def _database_url() -> str:
    return database_url(connection.settings_dict, connection.vendor)


def _env(broker: str | None = None) -> dict[str, str]:
    return process_env(
        database=_database_url(), broker=broker, broker_dir=settings.CELERY_BROKER_DIR
    )


@pytest.fixture
def broker_url() -> str:
    url = settings.CELERY_BROKER_URL
    if connection.vendor == "postgresql" and not url.startswith(("redis", "amqp")):
        message = (
            "the PostgreSQL legs run their workers on Redis or RabbitMQ: start one with "
            "scripts/with-redis.sh or scripts/with-rabbitmq.sh"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def start_worker(transactional_db: None, broker_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    env = _env(broker_url)
    started: list[WorkerProcess] = []

    def start(
        name: str = "w1",
        *,
        pool: str = "solo",
        concurrency: int = 1,
        queues: Sequence[str] = (),
        options: Sequence[str] = (),
        environ: dict[str, str] | None = None,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            f"{name}-{os.getpid()}",
            {**env, **(environ or {})},
            pool,
            concurrency,
            queues=queues,
            options=options,
        )
        started.append(worker)
        return worker

    purge_broker()
    yield start
    for worker in started:
        worker.stop()
    purge_broker()


@pytest.fixture
def start_beat(
    transactional_db: None, broker_url: str, tmp_path: Path
) -> Iterator[Callable[..., BeatProcess]]:
    """Start real beat processes against the test database and broker (stopped after)."""
    env = _env(broker_url)
    started: list[BeatProcess] = []

    def start(name: str = "beat", **environ: str) -> BeatProcess:
        process = BeatProcess(name, {**env, **environ}, tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_server(transactional_db: None, tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Start the API as a real server process against the test database (stopped after)."""
    env = _env()
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(env, tmp_path / f"gunicorn-{len(started)}.log")
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.running():
            # Not graceful: the test is over, and a graceful stop waits out long polls.
            server.kill(signal.SIGKILL)
