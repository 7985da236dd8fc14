"""The pull runner end to end (DESIGN 4.5): `manage.py runner` as its own process, talking
HTTP to a real server (pytest-django's live_server on loopback, transactional database). It
pops, heartbeats, runs a handler or a command, reports; a cancel stops it; SIGTERM lets a short
task finish and hands a long one back, attempt not spent."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from tasks import accounts, services
from tasks.models import Task, TaskStatus
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

S = TaskStatus


class Runner:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test"}
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runner", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runner did not exit:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def token(runner: User) -> str:
    return accounts.token_create(user=runner)[1]


@pytest.fixture
def start_runner(live_server: Any, token: str, tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    started: list[Runner] = []

    def start(
        scheduler_id: str, *work: str, max_tasks: int | None = 1, grace: float = 30
    ) -> Runner:
        args = [
            "--api-url",
            live_server.url,
            "--token",
            token,
            "--scheduler",
            scheduler_id,
            *work,
            "--poll-interval",
            "0.1",
            "--heartbeat",
            "0.5",
            "--grace",
            str(grace),
            "--name",
            f"r{len(started)}",
        ]
        if max_tasks is not None:
            args += ["--max-tasks", str(max_tasks)]
        runner = Runner(args, tmp_path / f"runner-{len(started)}.log")
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.kill()


def _wait_for(condition: Callable[[], Any], runner: Runner, *, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert runner.process.poll() is None or condition(), (
            f"runner exited ({runner.process.returncode}) before the condition:\n"
            + runner.output()[-3000:]
        )
        time.sleep(0.05)
    tasks = list(Task.objects.values_list("status", "attempts", "error"))
    raise AssertionError(f"timed out; tasks {tasks}; runner log:\n{runner.output()[-3000:]}")


def _status(task: Task) -> str:
    return Task.objects.values_list("status", flat=True).get(id=task.id)


def _pull(scheduler_id: str = "pull") -> None:
    services.scheduler_create(
        id=scheduler_id, retry_policy="none", max_attempts=1, dead_letter=False
    )


def _steps(task: Task) -> list[tuple[str, str, str]]:
    return list(task.events.order_by("at", "id").values_list("to_status", "actor", "note"))


def test_runner__handler_mode_completes_pushed_tasks(start_runner: Callable[..., Runner]) -> None:
    _pull()
    pushed = [services.task_push(scheduler_id="pull", data={"n": n}) for n in range(3)]

    runner = start_runner("pull", "--handler", "demo.echo", max_tasks=3)

    assert runner.wait() == 0, runner.output()
    assert "stopped after 3 tasks" in runner.output()
    for task in Task.objects.filter(id__in=[t.id for t in pushed]):
        assert (task.status, task.attempts, task.error) == (S.COMPLETED, 1, "")
        assert task.result == {"echo": task.data, "attempt": 1}
        assert [(to, actor) for to, actor, _ in _steps(task)] == [
            (S.QUEUED, ""),
            (S.DISPATCHED, "runner"),
            (S.RUNNING, "runner"),
            (S.COMPLETED, "runner"),
        ]


COMMAND_OK = (
    "import json, os, sys; data = json.load(sys.stdin); "
    "print(json.dumps({'doubled': data['n'] * 2, 'task': os.environ['TASK_ID'], "
    "'attempt': os.environ['TASK_ATTEMPT']}))"
)
COMMAND_FAILS = "import sys; sys.stderr.write('no such host: ' + sys.stdin.read()); sys.exit(1)"


def test_runner__command_mode_feeds_data_and_records_its_json(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={"n": 21})

    runner = start_runner("pull", "--command", shlex.join([sys.executable, "-c", COMMAND_OK]))

    assert runner.wait() == 0, runner.output()
    task.refresh_from_db()
    assert task.status == S.COMPLETED
    assert task.result == {"doubled": 42, "task": str(task.id), "attempt": "1"}


def test_runner__command_exit_1_is_a_failed_attempt_with_its_stderr(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={"host": "x"})

    runner = start_runner("pull", "--command", shlex.join([sys.executable, "-c", COMMAND_FAILS]))

    assert runner.wait() == 0, runner.output()
    task.refresh_from_db()
    assert (task.status, task.attempts) == (S.FAILED, 1)  # the queue does not retry
    assert task.error == 'RuntimeError: exit code 1: no such host: {"host": "x"}'
    assert "attempt 1/1 failed: RuntimeError: exit code 1" in _steps(task)[-1][2]


def test_runner__cancel_while_running_stops_the_work(start_runner: Callable[..., Runner]) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={"seconds": 30})
    runner = start_runner("pull", "--handler", "demo.sleep")
    _wait_for(lambda: _status(task) == S.RUNNING, runner)

    services.task_cancel(task_id=task.id, actor="operator")

    _wait_for(lambda: _status(task) == S.CANCELLED, runner, timeout=20)
    assert runner.wait(20) == 0, runner.output()
    assert "heartbeat refused" in runner.output()
    task.refresh_from_db()
    assert task.error.startswith("TaskCancelled: ")
    assert task.result is None


def test_runner__sigterm_hands_a_long_task_back_attempt_not_spent(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={"seconds": 30})
    runner = start_runner("pull", "--handler", "demo.sleep", max_tasks=None, grace=0.5)
    _wait_for(lambda: _status(task) == S.RUNNING, runner)

    runner.process.send_signal(signal.SIGTERM)

    assert runner.wait(20) == 0, runner.output()
    task.refresh_from_db()
    assert (task.status, task.attempts, task.lease_expires_at) == (S.QUEUED, 0, None)
    to_status, actor, note = _steps(task)[-1]
    assert (to_status, actor) == (S.QUEUED, "runner")
    assert note == "handed back, attempt not spent: r0 stopping"
    assert "stopped after 1 tasks" in runner.output()


def test_runner__sigterm_lets_a_short_task_finish_and_pops_no_more(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={"seconds": 1})
    runner = start_runner("pull", "--handler", "demo.sleep", max_tasks=None, grace=10)
    _wait_for(lambda: _status(task) == S.RUNNING, runner)

    runner.process.send_signal(signal.SIGTERM)
    later = services.task_push(scheduler_id="pull", data={"seconds": 1})

    assert runner.wait(30) == 0, runner.output()
    task.refresh_from_db()
    assert (task.status, task.attempts) == (S.COMPLETED, 1)
    assert task.result == {"slept": 1, "attempt": 1}
    assert _status(later) == S.QUEUED, "the runner popped after SIGTERM"


COMMAND_SLOW = (
    "import os, pathlib, sys, time; "
    "pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) is gone for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def test_runner__sigterm_stops_a_running_command(
    start_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    _pull()
    task = services.task_push(scheduler_id="pull", data={})
    pid_file = tmp_path / "command.pid"
    command = shlex.join([sys.executable, "-c", COMMAND_SLOW, str(pid_file)])
    runner = start_runner("pull", "--command", command, max_tasks=None, grace=0.5)
    _wait_for(lambda: _status(task) == S.RUNNING and pid_file.exists(), runner)
    _wait_for(lambda: pid_file.read_text(), runner)
    pid = int(pid_file.read_text())

    runner.process.send_signal(signal.SIGTERM)

    assert runner.wait(20) == 0, runner.output()
    assert (_status(task), Task.objects.get(id=task.id).attempts) == (S.QUEUED, 0)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the command outlived its runner"
