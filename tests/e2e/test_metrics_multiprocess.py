"""/metrics sums the histograms of every process (issue 13: "histograms are empty under make
run"): a Celery worker's children record queue wait and transitions in prometheus-client's
multiprocess files, and the web process's /metrics reads them. `make run` sets the folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tasks import services
from tasks.models import Task, TaskStatus
from tests.e2e.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.mark.e2e
def test_metrics__histograms_of_worker_children_reach_metrics(
    start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    services.scheduler_create(id="echo", kind="celery", handler="demo.echo")
    start_worker(
        "w1", pool="prefork", concurrency=2, environ={"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    )

    for n in range(4):
        services.task_push(scheduler_id="echo", data={"n": n})
    done = Task.objects.filter(scheduler_id="echo", status=TaskStatus.COMPLETED)
    wait_for(lambda: done.count() == 4, message="4 completed")

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))  # as `make run` gives the web
    client = Client()
    client.force_login(User.objects.create_user("prometheus"))
    text = client.get("/metrics").content.decode()

    waits = _samples(text, "scheduler_queue_wait_seconds_count")
    assert waits == {(("scheduler", "echo"),): 4.0}, "claimed in the worker's children"
    completed = _samples(text, "scheduler_transition_seconds_count")
    assert completed[(("to_status", "COMPLETED"),)] >= 4.0
    assert _samples(text, "scheduler_tasks")[(("scheduler", "echo"), ("status", "COMPLETED"))] == 4


def test_make_run__gives_every_process_an_emptied_metrics_folder() -> None:
    make = shutil.which("make") or "make"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    recipe = subprocess.run(
        [make, "-n", "-o", "migrate", "run"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    folder = ROOT / "var" / "metrics"
    assert f'rm -rf "{folder}" && mkdir -p "{folder}"' in recipe
    assert f'PROMETHEUS_MULTIPROC_DIR="${{PROMETHEUS_MULTIPROC_DIR:-{folder}}}"' in recipe
    assert recipe.index("rm -rf") < recipe.index("honcho start")
