"""The README's curl walk-through, run as printed against a live server (only its address is
replaced): every step must work, in order, with nothing but the shell variables it sets."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User

from schedules.models import Schedule
from tasks.models import Task, TaskStatus
from tasks.roles import OPERATORS
from tests.e2e.conftest import ROOT, ServerProcess, _database_url

pytestmark = pytest.mark.e2e


def _walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("A walk-through with curl") :]
    match = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert match, "the README has no curl walk-through block"
    return match.group(1)


def test_readme__curl_walkthrough_runs_as_printed(
    start_server: Callable[[], ServerProcess], tmp_path: Path
) -> None:
    operator = User.objects.create_user(username="operator", is_staff=True)
    operator.groups.add(Group.objects.get(name=OPERATORS))
    server = start_server()
    script = _walkthrough().replace("http://127.0.0.1:8000", server.url)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
    }

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"detail"' not in done.stdout, done.stdout[-2000:]
    task = Task.objects.get(scheduler_id="boefje-org0", hash="acme-dns")
    assert (task.status, task.result) == (TaskStatus.COMPLETED, {"changed": False})
    assert Schedule.objects.filter(scheduler_id="boefje-org0", hash="acme-nightly").exists()
