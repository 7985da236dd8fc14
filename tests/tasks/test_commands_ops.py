"""`manage.py health` and `manage.py workers list`: GET /api/health/ and /api/workers/ at a
shell (issue 13, part 5: a command for every operator read and action of the API)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks import workers

pytestmark = pytest.mark.django_db


def test_health__prints_the_report_and_exits_1_when_a_component_is_down() -> None:
    out = StringIO()
    with pytest.raises(CommandError, match=r"^down: celery workers$"):
        call_command("health", "--json", stdout=out)  # no worker has ever been seen
    report = json.loads(out.getvalue())
    components = {c["name"]: c["status"] for c in report["components"]}
    assert report["status"] == "down" and components["celery workers"] == "down"
    assert components["database"] == "ok"


def test_health__ok_with_a_live_worker_and_strict_fails_on_degraded() -> None:
    workers.worker_seen(kind="celery", name="w1@h", host="h", pid=1, queues=["celery"])
    out = StringIO()
    call_command("health", stdout=out)  # beat has no periodic job: degraded, exit 0
    assert "overall: degraded" in out.getvalue()
    with pytest.raises(CommandError, match=r"^degraded: beat$"):
        call_command("health", "--strict", stdout=StringIO())


def test_workers_list__as_the_api() -> None:
    workers.worker_seen(kind="celery", name="w1@h", host="h", pid=1, queues=["celery"])
    out = StringIO()
    call_command("workers", "list", "--json", stdout=out)
    [row] = json.loads(out.getvalue())
    assert (row["name"], row["kind"], row["state"], row["queues"]) == (
        "w1@h", "celery", "live", ["celery"]
    )  # fmt: skip
    table = StringIO()
    call_command("workers", "list", "--kind", "runner", stdout=table)
    assert "w1@h" not in table.getvalue() and "name" in table.getvalue()
