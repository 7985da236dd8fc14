"""Real processes for the end-to-end tests and the benchmarks: Celery workers, beat, gunicorn,
a broker that crashes and comes back. One copy, used by tests/e2e's fixtures and by bench/.

Nothing here is eager or mocked: each class starts the real command line a deployment runs.
"""

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
GUNICORN = str(BIN / "gunicorn")


def database_url(settings_dict: Mapping[str, Any], vendor: str) -> str:
    """DATABASE_URL of a Django connection's settings, for a child process to reach the same
    database (the test database, with its test name)."""
    if vendor == "sqlite":
        return f"sqlite:///{settings_dict['NAME']}"
    return (
        f"postgres://{settings_dict['USER']}@{settings_dict['HOST']}:{settings_dict['PORT']}"
        f"/{settings_dict['NAME']}"
    )


def process_env(
    *,
    database: str,
    broker: str | None = None,
    broker_dir: str | Path | None = None,
    settings_module: str = "scheduler_site.settings_test",
    **extra: str,
) -> dict[str, str]:
    """The environment of a worker, beat or server: this one's, pointed at `database` (and
    `broker`). `extra` goes on top (the benches: DEBUG=0 with a throwaway SECRET_KEY)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module, "DATABASE_URL": database}
    if broker is not None:
        env["CELERY_BROKER_URL"] = broker
    if broker_dir is not None:
        env["SCHEDULER_BROKER_DIR"] = str(broker_dir)
    env.update(extra)
    return env


def purge_broker() -> None:
    """Drop every message waiting in the configured broker (between tests or bench legs)."""
    from scheduler_site.celery import app

    # An empty filesystem broker folder may not exist yet: nothing to purge then.
    with contextlib.suppress(Exception):
        app.control.purge()
    if str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        with contextlib.suppress(Exception):  # as the purge: a Redis down is the test's news
            _drop_redis_unacked(app)


def _drop_redis_unacked(app: Any) -> None:
    """Redis keeps the deliveries workers took and never acknowledged (a SIGKILLed worker's)
    in keys of the whole database, and kombu puts them back on their queues once their
    visibility timeout passes: a killed worker of one test would hand its messages to a
    later test's workers. Only between tests or bench legs, with no worker running."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.client.delete(
            channel.unacked_key, channel.unacked_index_key, channel.unacked_mutex_key
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Child:
    """A child process whose output lines a thread collects; `_seen(line)` sees each one."""

    process: subprocess.Popen[str]

    def _spawn(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._seen(line.rstrip())

    def _seen(self, line: str) -> None:
        raise NotImplementedError

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


class WorkerProcess(_Child):
    """`celery -A scheduler_site worker`; returns once it logged " ready." (else raises)."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        pool: str,
        concurrency: int,
        *,
        queues: Sequence[str] = (),
        options: Sequence[str] = (),
        ready_seconds: float = 60,
        app: str = "scheduler_site",
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ready = threading.Event()
        command = [
            CELERY, "-A", app, "worker", "-l", "INFO", "-n", f"{name}@%h",
            "--pool", pool, "--concurrency", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat", *options,
        ]  # fmt: skip
        if queues:  # a dedicated pool: only these Celery queues (without -Q: default + system)
            command += ["-Q", ",".join(queues)]
        self._spawn(command, env)
        if not self.ready.wait(ready_seconds):
            self.stop()
            raise AssertionError(f"worker {name} did not start:\n" + "\n".join(self.lines[-40:]))

    def _seen(self, line: str) -> None:
        self.lines.append(line)
        if " ready." in line:
            self.ready.set()


class BeatProcess(_Child):
    """A real `celery beat` with the leased scheduler; each output line kept with the
    monotonic time it arrived."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.lines: list[tuple[float, str]] = []
        command = [
            CELERY, "-A", "scheduler_site", "beat", "-l", "INFO", "--pidfile=",
            "-s", str(workdir / f"{name}-schedule"),
        ]  # fmt: skip
        self._spawn(command, {**env, "PYTHONUNBUFFERED": "1"})

    def _seen(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))

    def times(self, text: str) -> list[float]:
        return [at for at, line in list(self.lines) if text in line]


class ServerProcess:
    """A WSGI application served by a real gunicorn in its own process group, on a fixed
    loopback port so that it can be killed and started again where its clients expect it.
    The tests' default: gthread workers that keep connections alive, as in production; the
    bench names its own (`-w 4`, or its plain-view module)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        *,
        app: str = "scheduler_site.wsgi",
        workers: int = 1,
        threads: int = 4,
    ) -> None:
        self.env, self.log = dict(env), log
        self.app, self.workers, self.threads = app, workers, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60) -> None:
        command = [GUNICORN, self.app, "-b", f"127.0.0.1:{self.port}", "-w", str(self.workers)]
        if self.threads > 1:
            command += ["--threads", str(self.threads)]
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
        self.wait_until_up(timeout)

    def wait_until_up(self, timeout: float = 60) -> int:
        """Until /healthz answers; its HTTP status (a 503 only says the broker is down)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gunicorn exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
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
