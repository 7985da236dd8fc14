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
from tests.e2e.fault_proxy import DROP_ANSWER, Answer, FaultProxy, Seen
from tests.support.processes import ROOT, ServerProcess

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
        scheduler_id: str,
        *work: str,
        max_tasks: int | None = 1,
        grace: float = 30,
        api_url: str | None = None,
        key: str | None = None,
    ) -> Runner:
        args = [
            "--api-url",
            api_url or live_server.url,
            "--token",
            key or token,
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


def test_runner__batch_option_pops_and_reports_several_tasks_per_request(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    pushed = [services.task_push(scheduler_id="pull", data={"n": n}) for n in range(4)]

    runner = start_runner("pull", "--handler", "demo.echo", "--batch", "4", max_tasks=4)

    assert runner.wait() == 0, runner.output()
    assert "stopped after 4 tasks" in runner.output()
    tasks = Task.objects.filter(id__in=[t.id for t in pushed])
    assert {(t.status, t.attempts) for t in tasks} == {(S.COMPLETED, 1)}
    # one pop of 4 and one batch start: all four were handed out and started together
    dispatched = {t.events.get(to_status=S.DISPATCHED).at for t in tasks}
    assert len(dispatched) == 1, dispatched


def test_runner__batch_option_outside_the_pop_limit_is_refused(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()
    runner = start_runner("pull", "--handler", "demo.echo", "--batch", "0")

    assert runner.wait() != 0
    assert "--batch" in runner.output() and "'0' is not a whole number" in runner.output()


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


# --- the API going away (issue 10, item 4) ----------------------------------------------------


def _completions(task: Task) -> int:
    return task.events.filter(to_status=S.COMPLETED).count()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_runner__survives_a_server_restart_mid_task(
    start_runner: Callable[..., Runner], start_server: Callable[[], ServerProcess], signum: int
) -> None:
    _pull()
    server = start_server()
    task = services.task_push(scheduler_id="pull", data={"seconds": 3})
    runner = start_runner("pull", "--handler", "demo.sleep", max_tasks=None, api_url=server.url)
    _wait_for(lambda: _status(task) == S.RUNNING, runner)

    server.kill(signum)  # mid-task: heartbeats and then the report find nobody there
    time.sleep(5)
    assert runner.process.poll() is None, runner.output()
    server.start()
    later = services.task_push(scheduler_id="pull", data={"seconds": 0.1})

    _wait_for(lambda: _status(task) == _status(later) == S.COMPLETED, runner, timeout=90)
    assert runner.process.poll() is None, runner.output()
    task.refresh_from_db()
    assert (task.attempts, task.result) == (1, {"slept": 3, "attempt": 1})
    assert _completions(task) == 1
    assert "retrying" in runner.output()


def test_runner__a_report_whose_answer_was_lost_is_not_made_twice(
    start_runner: Callable[..., Runner], live_server: Any
) -> None:
    """The COMPLETED report reaches the server, the connection drops before its answer: the
    retry is answered 409 (already COMPLETED, by this very report). The runner says so and
    goes on to the next task."""

    def lose_first_completion(seen: Seen, history: list[Seen]) -> str | None:
        reported = [s for s in history if (s.body or {}).get("status") == "COMPLETED"]
        if (seen.body or {}).get("status") == "COMPLETED" and not reported:
            return DROP_ANSWER
        return None

    proxy = FaultProxy(live_server.url, lose_first_completion)
    _pull()
    first = services.task_push(scheduler_id="pull", data={"n": 1})
    second = services.task_push(scheduler_id="pull", data={"n": 2})
    try:
        runner = start_runner("pull", "--handler", "demo.echo", max_tasks=2, api_url=proxy.url)
        assert runner.wait() == 0, runner.output()
    finally:
        proxy.close()

    assert _status(first) == _status(second) == S.COMPLETED
    assert _completions(Task.objects.get(id=first.id)) == 1
    completions = [s for s in proxy.seen if (s.body or {}).get("status") == "COMPLETED"]
    assert [s.status for s in completions] == [200, 409, 200]
    assert f"task {first.id} was already COMPLETED" in runner.output()
    assert "stopped after 2 tasks" in runner.output()


def _with_lease_token(seen: Seen) -> Any:
    """Until the server hands out lease tokens, give the popped tasks one, so the test sees
    the runner carry it (a server that has them keeps its own)."""
    if seen.path.endswith("/pop/") and seen.status == 200:
        for task in seen.answer["results"]:
            task.setdefault("lease_token", f"proxy-{task['id']}")
    return seen.answer


def _unavailable_once_each(seen: Seen, history: list[Seen]) -> Answer | None:
    """One 503 for the first pop, a 429 (Retry-After: 1) for the start, a 502 for the first
    heartbeat, a 504 for the report: each retried."""
    kind = (seen.method, seen.path.rsplit("/", 2)[-2], (seen.body or {}).get("status"))
    if any(
        (s.method, s.path.rsplit("/", 2)[-2], (s.body or {}).get("status")) == kind for s in history
    ):
        return None
    return {
        ("POST", "pop", None): Answer(503, body={"detail": "restarting"}),
        ("PATCH", str(kind[1]), "RUNNING"): Answer(429, {"Retry-After": "1"}, {"detail": "slow"}),
        ("POST", "heartbeat", None): Answer(502, body={"detail": "bad gateway"}),
        ("PATCH", str(kind[1]), "COMPLETED"): Answer(504, body={"detail": "timeout"}),
    }.get(kind)


def test_runner__retries_unavailable_answers_on_one_connection_with_its_lease(
    start_runner: Callable[..., Runner], live_server: Any
) -> None:
    proxy = FaultProxy(live_server.url, _unavailable_once_each, _with_lease_token)
    _pull()
    task = services.task_push(scheduler_id="pull", data={"seconds": 3})
    try:
        runner = start_runner("pull", "--handler", "demo.sleep", api_url=proxy.url)
        assert runner.wait() == 0, runner.output()
    finally:
        proxy.close()

    task.refresh_from_db()
    assert (task.status, task.attempts, _completions(task)) == (S.COMPLETED, 1, 1)
    statuses = [(s.method, s.path.rsplit("/", 2)[-2], s.status) for s in proxy.seen]
    assert statuses[:2] == [("POST", "pop", None), ("POST", "pop", 200)]
    assert {None, 200} <= {s.status for s in proxy.seen if s.path.endswith("/heartbeat/")}
    token = proxy.seen[1].answer["results"][0]["lease_token"]
    after_pop = [s for s in proxy.seen[2:] if s.method in ("PATCH", "POST")]
    assert after_pop and all(s.body["lease_token"] == token for s in after_pop)
    assert all(s.body["attempt"] == 1 for s in after_pop)
    # One kept-alive connection for the calls of the main loop, one for the heartbeats.
    assert len(proxy.seen) >= 8 and proxy.connections <= 2, (len(proxy.seen), proxy.connections)


def test_runner__a_refused_token_stops_it_with_a_clear_message(
    start_runner: Callable[..., Runner],
) -> None:
    _pull()

    runner = start_runner("pull", "--handler", "demo.echo", key="not-a-token")

    assert runner.wait(30) == 1, runner.output()
    assert "the API refused the runner's token (HTTP 401" in runner.output()


def test_runner__sigterm_while_the_api_is_down_gives_up_after_the_grace(
    start_runner: Callable[..., Runner], start_server: Callable[[], ServerProcess]
) -> None:
    _pull()
    server = start_server()
    task = services.task_push(scheduler_id="pull", data={"seconds": 60})
    runner = start_runner(
        "pull", "--handler", "demo.sleep", max_tasks=None, grace=1, api_url=server.url
    )
    _wait_for(lambda: _status(task) == S.RUNNING, runner)
    server.kill()
    _wait_for(lambda: "retrying" in runner.output(), runner, timeout=20)

    sent = time.monotonic()
    runner.process.send_signal(signal.SIGTERM)

    assert runner.wait(30) == 0, runner.output()
    assert time.monotonic() - sent < 15, runner.output()
    assert f"could not hand task {task.id} back" in runner.output()
    assert _status(task) == S.RUNNING  # its lease runs out and the reaper takes it back
