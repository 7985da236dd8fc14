"""LOG_FORMAT=json: one JSON object a line, carrying the task id, scheduler and attempt bound
for the task being run; off by default. Through a real worker: tests/e2e/test_queues.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler_site import log_context
from tests.test_settings import settings_of


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("tests.log_context")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    log_context.use_json(logger)
    yield logger, out
    logger.removeHandler(handler)


def _records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_log__carries_the_bound_task_fields(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = json_log

    with log_context.bound(task_id="t-1", scheduler="boefje", attempt=2):
        logger.info("claimed %s", "t-1")
        logger.warning("one of its own", extra={"attempt": 3})
    logger.info("between tasks")

    first, second, third = _records(out)
    assert {k: first[k] for k in ("level", "logger", "message", "task_id", "scheduler")} == {
        "level": "INFO",
        "logger": "tests.log_context",
        "message": "claimed t-1",
        "task_id": "t-1",
        "scheduler": "boefje",
    }
    assert first["attempt"] == 2 and "time" in first
    assert second["attempt"] == 3, "a field the caller set itself wins"
    assert "task_id" not in third and log_context.current() == {}


def test_log_format__plain_by_default_json_on_request(tmp_path: Path) -> None:
    show = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.LOGGING['handlers']['console']['formatter'])"
    )

    plain = settings_of(tmp_path, show, DEBUG="1")
    as_json = settings_of(tmp_path, show, DEBUG="1", LOG_FORMAT="json")
    bad = settings_of(tmp_path, show, DEBUG="1", LOG_FORMAT="xml")

    assert (plain.stdout.strip(), as_json.stdout.strip()) == ("plain", "json"), plain.stderr
    assert bad.returncode != 0 and "LOG_FORMAT='xml': use plain or json" in bad.stderr
