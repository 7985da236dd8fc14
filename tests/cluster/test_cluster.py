"""Many machines, one system: three hosts in network namespaces (scripts/with-cluster.sh):
"db" runs PostgreSQL, Redis and this test; two app hosts each run gunicorn, a Celery worker,
beat (leased) and a pull runner, all over the namespaces' own addresses. Work is pushed
continuously; then every process of app host 1 is SIGKILLed at once, as a lost machine.
Shown: no task lost, none completed twice, the periodic jobs go on (beat's lease moves to host
2, the reaper and the orchestrator keep running), and host 2's worker and runner finish what
host 1 held. CLUSTER_TEST_SECONDS sets how long work is pushed (make test: 20; make
test-cluster: 60)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.db.models import Count
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from scheduler_site.beat import BEAT_LEASE
from schedules import services as schedule_services
from tasks import accounts, locks, services
from tasks.models import ACTIVE_STATUSES, Task, TaskEvent, TaskStatus
from tasks.roles import RUNNERS
from tests.e2e.conftest import ROOT, _database_url

pytestmark = pytest.mark.cluster

S = TaskStatus
SECONDS = float(os.environ.get("CLUSTER_TEST_SECONDS", "20"))
KILL_AT = SECONDS / 3
BIN = Path(sys.executable).parent
BEAT_LEASE_SECONDS = 4
LONG = 3.0  # seconds of the long tasks among the short ones


@dataclass
class Host:
    """One app host: its namespace, address, and the processes started in it."""

    name: str
    netns: str
    addr: str
    env: dict[str, str]
    logdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, role: str, command: list[str], **environ: str) -> subprocess.Popen[bytes]:
        with (self.logdir / f"{self.name}-{role}.log").open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *command],
                cwd=ROOT,
                env={**self.env, **environ},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes[role] = process
        return process

    def log(self, role: str) -> str:
        return (self.logdir / f"{self.name}-{role}.log").read_text(errors="replace")

    def kill_everything(self) -> None:
        """SIGKILL every process in the namespace at once: the host is gone."""
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for process in self.processes.values():
            process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:8000"


def _wait(condition: Any, *, timeout: float, message: str, host: Host | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    roles = host.processes if host else {}
    logs = "".join(f"\n--- {role}:\n{host.log(role)[-1500:]}" for role in roles)
    raise AssertionError(f"timed out waiting for {message}{logs}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10):
            return True
    except urllib.error.HTTPError:
        return True  # it answers
    except OSError:
        return False


def _runner_token(name: str) -> str:
    user = User.objects.create_user(username=name)
    user.groups.add(Group.objects.get(name=RUNNERS))
    return accounts.token_create(user=user)[1]


def _set_up_work() -> None:
    retry = {"retry_policy": "fixed", "retry_delay_seconds": 1, "retry_jitter": False}
    # Leases of seconds, not minutes: a task whose holder died comes back after its lease (a
    # worker's, once running, after 3 heartbeats; one killed before its first, after this).
    services.scheduler_create(
        id="cl-work", kind="celery", handler="demo.sleep", dispatch_threshold=8,
        lease_seconds=10, max_attempts=5, **retry,
    )  # fmt: skip
    services.scheduler_create(id="cl-pull", kind="pull", lease_seconds=6, max_attempts=5, **retry)
    schedule_services.schedule_create(
        scheduler_id="cl-work", interval_seconds=2, data={"seconds": 0.05}, actor="test"
    )
    # The periodic jobs at a quick cadence: the reaper matters most when a host is lost.
    with override_settings(
        ORCHESTRATOR_TICK_SECONDS=1, REAPER_INTERVAL_SECONDS=2, DISPATCH_INTERVAL_SECONDS=2
    ):
        call_command("setup_periodic_tasks", stdout=open(os.devnull, "w"))  # noqa: SIM115


def _start_host(host: Host, token: str) -> None:
    host.start("web", [str(BIN / "gunicorn"), "scheduler_site.wsgi", "-b", f"{host.addr}:8000",
                       "-w", "2", "--threads", "4"])  # fmt: skip
    host.start("worker", [str(BIN / "celery"), "-A", "scheduler_site", "worker", "-l", "INFO",
                          "-n", f"{host.name}@%h", "-c", "2", "--without-gossip",
                          "--without-mingle", "--without-heartbeat"])  # fmt: skip
    schedule_file = str(host.logdir / f"{host.name}-beat-schedule")
    host.start("beat", [str(BIN / "celery"), "-A", "scheduler_site", "beat", "-l", "INFO",
                        "--pidfile=", "-s", schedule_file])  # fmt: skip
    _wait(lambda: _answers(host.url), timeout=90, message=f"{host.name}'s gunicorn", host=host)
    host.start("runner", [sys.executable, "manage.py", "runner", "--api-url", host.url,
                          "--scheduler", "cl-pull", "--handler", "demo.sleep",
                          "--name", f"runner-{host.name}", "--poll-interval", "0.5",
                          "--heartbeat", "2"], SCHEDULER_API_TOKEN=token)  # fmt: skip
    _wait(lambda: " ready." in host.log("worker"), timeout=90, message="worker", host=host)


@pytest.fixture
def hosts(transactional_db: None, tmp_path: Path) -> Iterator[list[Host]]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "BEAT_LEASE_SECONDS": str(BEAT_LEASE_SECONDS),
        "PYTHONUNBUFFERED": "1",
    }
    netns, addrs = os.environ["CLUSTER_APP_NETNS"].split(), os.environ["CLUSTER_APP_ADDRS"].split()
    pairs = enumerate(zip(netns, addrs, strict=True))
    started = [Host(f"app{n + 1}", ns, addr, env, tmp_path) for n, (ns, addr) in pairs]
    yield started
    for host in started:
        host.stop()


def _held_by(host: Host) -> list[Task]:
    """Tasks a process of `host` holds: claimed by its worker, or popped by its runner."""
    held = Task.objects.filter(status__in=[S.DISPATCHED, S.RUNNING])
    return [t for t in held if t.worker.startswith((f"{host.name}@", f"runner-{host.name}"))]


def _mid_task(host: Host) -> bool:
    """Whether the host is well into a long task that has seconds yet to run: killed now, it
    surely dies holding it (a short one could finish between this look and the kill)."""
    recent = timezone.now() - timedelta(seconds=LONG / 2)
    return any(t.data["seconds"] == LONG and t.modified_at > recent for t in _held_by(host))


def _push_for(seconds: float, *, then: Any, when: Any, at: float) -> int:
    """Push 5 celery and 2 pull tasks a second for `seconds`; call `then()` once, from `at`
    seconds on, as soon as `when()` is true."""
    started, pushed, n = time.monotonic(), 0, 0
    while (elapsed := time.monotonic() - started) < seconds:
        if then is not None and elapsed >= at and when():
            then()
            then = None
        length = LONG if n % 10 == 0 else 0.4  # a long one now and then: see _mid_task
        services.task_push(scheduler_id="cl-work", data={"seconds": length, "n": n})
        if n % 5 in (0, 2):
            services.task_push(scheduler_id="cl-pull", data={"seconds": length, "n": n})
            pushed += 1
        pushed, n = pushed + 1, n + 1
        time.sleep(0.2)
    return pushed


def test_cluster__losing_an_app_host_loses_no_task_and_the_other_host_takes_over(
    hosts: list[Host],
) -> None:
    first, second = hosts
    _set_up_work()
    _start_host(first, _runner_token("runner-app1"))
    beat_pid = first.processes["beat"].pid
    _wait(lambda: f"pid {beat_pid} " in getattr(locks.holder(BEAT_LEASE), "owner", ""),
          timeout=60, message="app1's beat holding the lease")  # fmt: skip
    _start_host(second, _runner_token("runner-app2"))

    lost_host: dict[str, Any] = {}

    def lose_first_host() -> None:
        lost_host["at"] = timezone.now()
        first.kill_everything()
        # What it held when it died (it can change nothing any more; the leases it held
        # run for seconds yet, so nothing has taken them back).
        lost_host["held"] = [t.id for t in _held_by(first)]

    # Lost while it holds work (a worker's task, a runner's): what must not be lost.
    pushed = _push_for(SECONDS, then=lose_first_host, when=lambda: _mid_task(first), at=KILL_AT)
    _wait(lambda: not Task.objects.filter(status__in=ACTIVE_STATUSES, schedule=None).exists(),
          timeout=180, message="every pushed task final")  # fmt: skip

    killed_at, held = lost_host["at"], lost_host["held"]
    pushed_tasks = Task.objects.filter(schedule=None)
    statuses = Counter(pushed_tasks.values_list("status", flat=True))
    completions = TaskEvent.objects.filter(task__schedule=None, to_status=S.COMPLETED)
    twice = completions.values("task").annotate(n=Count("id")).filter(n__gt=1)
    finished = {e.task_id: e.at for e in completions.filter(task_id__in=held)}
    recovery = max((at - killed_at).total_seconds() for at in finished.values()) if held else 0
    print(
        f"\ncluster: {pushed} tasks pushed over {SECONDS:.0f} s, app1 lost (from {KILL_AT:.0f} s "
        f"on) holding {len(held)}; all it held done {recovery:.1f} s later"
    )

    assert statuses == {S.COMPLETED: pushed}, f"lost or failed: {statuses}"
    assert not twice.exists(), "a task was completed twice"
    assert held, "app1 held no task when it was lost: the test proved nothing"
    assert set(finished) == set(held)
    assert {t.worker.split("@")[0] for t in Task.objects.filter(id__in=held)} <= {
        "app2",
        "runner-app2",
    }
    assert f"pid {second.processes['beat'].pid} " in locks.holder(BEAT_LEASE).owner
    # The periodic jobs went on: the orchestrator still turns the schedule into tasks, and
    # the reaper (whose runs took back what app1 held) ran since.
    assert Task.objects.filter(schedule__isnull=False, created_at__gt=killed_at).exists()
    assert PeriodicTask.objects.get(name="scheduler: lease reaper").last_run_at > killed_at
    assert recovery <= 60, f"app1's tasks took {recovery:.1f} s to finish elsewhere"
