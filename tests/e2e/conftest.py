"""Real Celery worker processes against the real test database and a real broker: the
filesystem transport with SQLite, Redis with PostgreSQL. Nothing here is eager or mocked."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from tasks import dispatch, housekeeping
from tasks.models import Task

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


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


class WorkerProcess:
    def __init__(
        self,
        name: str,
        env: dict[str, str],
        pool: str,
        concurrency: int,
        *,
        queues: Sequence[str] = (),
        options: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ready = threading.Event()
        command = [
            CELERY, "-A", "scheduler_site", "worker", "-l", "INFO", "-n", f"{name}@%h",
            "--pool", pool, "--concurrency", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat", *options,
        ]  # fmt: skip
        if queues:  # a dedicated pool: only these Celery queues (without -Q: default + system)
            command += ["-Q", ",".join(queues)]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.stop()
            raise AssertionError(f"worker {name} did not start:\n" + "\n".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if " ready." in line:
                self.ready.set()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine would: no cleanup runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def start_worker(transactional_db: None, broker_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
        "CELERY_BROKER_URL": broker_url,
        "SCHEDULER_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
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

    _purge(broker_url)
    yield start
    for worker in started:
        worker.stop()
    _purge(broker_url)


class BeatProcess:
    """A real `celery beat` with the leased scheduler; each output line kept with the
    monotonic time it arrived."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.lines: list[tuple[float, str]] = []
        command = [
            CELERY, "-A", "scheduler_site", "beat", "-l", "INFO", "--pidfile=",
            "-s", str(workdir / f"{name}-schedule"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def times(self, text: str) -> list[float]:
        return [at for at, line in list(self.lines) if text in line]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def start_beat(
    transactional_db: None, broker_url: str, tmp_path: Path
) -> Iterator[Callable[..., BeatProcess]]:
    """Start real beat processes against the test database and broker (stopped after)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
        "CELERY_BROKER_URL": broker_url,
        "SCHEDULER_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
    started: list[BeatProcess] = []

    def start(name: str = "beat", **environ: str) -> BeatProcess:
        beat = BeatProcess(name, {**env, **environ}, tmp_path)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def _purge(broker_url: str) -> None:
    from scheduler_site.celery import app

    # An empty filesystem broker folder may not exist yet: nothing to purge then.
    with contextlib.suppress(Exception):
        app.control.purge()


def beat() -> None:
    """One round of the periodic jobs that move tasks along: what beat would run."""
    housekeeping.tasks_reap_expired()
    dispatch.dispatch_all()


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 60, message: str = "condition"
) -> Any:
    """Poll (running the periodic jobs as beat would) until `condition()` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        beat()
        time.sleep(0.2)
    statuses = list(Task.objects.values_list("status", "attempts", "error"))
    raise AssertionError(f"timed out waiting for {message}; tasks: {statuses[:20]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """The API served by a real gunicorn (gthread workers keep connections alive, as in
    production) in its own process group, on a fixed loopback port so that it can be killed
    and started again where its clients expect it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60) -> None:
        command = [str(Path(sys.executable).with_name("gunicorn")), "scheduler_site.wsgi"]
        command += ["-b", f"127.0.0.1:{self.port}", "-w", "1", "--threads", "4"]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self._wait_until_up(timeout)

    def _wait_until_up(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gunicorn exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answers (a 503 only says the broker is not reachable)
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"gunicorn did not answer:\n{self.log.read_text()[-3000:]}")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal the whole group: with SIGKILL no worker outlives its master to keep serving."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
        # A graceful stop lets requests in flight finish, long-polling pops included (up to
        # their `wait`), within gunicorn's graceful timeout (30 s) before it kills them.
        self.process.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a worker left behind by SIGTERM

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture
def start_server(transactional_db: None, tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Start the API as a real server process against the test database (stopped after)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
        "SCHEDULER_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
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


def restart_broker(url: str, *, down_seconds: float = 2.0) -> None:
    """Crash the test run's broker and start it again on the same port: Redis (no
    persistence: every message in it is lost) or RabbitMQ (its Erlang VM SIGKILLed; durable
    messages may survive, duplicates are harmless)."""
    if url.startswith("redis"):
        restart_redis(url, down_seconds=down_seconds)
        return
    if not url.startswith("amqp"):
        raise AssertionError(f"no server to restart behind {url.split(':')[0]}://")
    subprocess.run(
        [str(ROOT / "scripts" / "with-rabbitmq.sh"), "--restart", os.environ["TEST_RABBITMQ_DIR"],
         str(down_seconds)],
        check=True,
        timeout=120,
    )  # fmt: skip


def restart_redis(url: str, *, down_seconds: float = 2.0) -> None:
    """Stop the throwaway Redis at `url` (scripts/with-redis.sh's: no persistence, so every
    message in it is lost) and start a new one on the same port, as a crashed and restarted
    broker. with-redis.sh's cleanup stops the new one by port."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], check=False, timeout=10)
    time.sleep(down_seconds)
    workdir = Path(tempfile.mkdtemp(prefix="scheduler-redis-restarted."))
    subprocess.run(
        [
            "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--daemonize", "yes",
            "--logfile", str(workdir / "redis.log"),
        ],
        check=True,
        timeout=10,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ping = subprocess.run(["redis-cli", "-p", port, "ping"], capture_output=True, text=True)
        if ping.stdout.strip() == "PONG":
            return
        time.sleep(0.1)
    raise AssertionError(f"Redis did not come back on port {port}")
