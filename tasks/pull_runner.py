"""The pull runner: pops tasks of a scheduler over the REST API, heartbeats, runs a registered
handler or an operator's command, and reports the result. On SIGTERM it stops popping, lets the
current task finish within a grace period, and otherwise hands it back (attempt not spent).

Every call goes over one kept-alive HTTP session and is retried, with exponential backoff and
jitter, on what a restarting server, a proxy or a throttle answer (no connection, a timeout,
502/503/504, 429 after its Retry-After): the same body each time, so a task keeps its attempt
and lease token. 401/403 are final: the runner stops with the server's reason."""

from __future__ import annotations

import contextvars
import email.utils
import json
import logging
import os
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import tenacity

from scheduler_site import tracing
from tasks.registry import Handler, TaskCancelled, TaskContext

logger = logging.getLogger(__name__)

# What a server that is restarting, overloaded or behind a proxy answers: try again later.
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
# The token is wrong, expired, revoked or lacks the right: no retry can change that.
AUTH_STATUSES = frozenset({401, 403})
# No answer at all; a timed-out or dropped request may still have reached the server.
UNREACHABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class ApiError(Exception):
    """The API answered with an error status."""

    def __init__(self, status: int, body: Any, *, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.retry_after = retry_after
        # An earlier try of the same call got no answer: it may have landed (see `landed`).
        self.retried = False

    def landed(self, status: str) -> bool:
        """A 409 saying the task already is in `status`: an earlier try of this very call did
        it, and only its answer was lost."""
        current = self.body.get("status") if isinstance(self.body, dict) else None
        return self.status == 409 and self.retried and current == status


class AuthRefused(ApiError):
    """401 or 403: final, the runner stops."""


class ApiUnreachable(Exception):
    """No final answer: no connection, a timeout or 429/502/503/504 until the retry budget
    ran out, or the caller stopped the retries (SIGTERM, the task ended)."""


class _GiveUp(Exception):
    """Raised from the backoff sleep when the caller no longer wants the answer."""


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unreadable: the usual backoff applies
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _never() -> bool:
    return False


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        return error.status in RETRIED_STATUSES
    return isinstance(error, ApiUnreachable)


def _sleeper(give_up: Callable[[], bool]) -> Callable[[float], None]:
    """A backoff sleep that ends as soon as `give_up()` turns true (polled every 0.1 s)."""

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not give_up():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))
        raise _GiveUp

    return sleep


@dataclass
class ApiClient:
    """The runner's HTTP session: one connection pool, kept alive, for every call."""

    base_url: str
    token: str
    timeout: float = 30.0
    max_retry_seconds: float = 300.0
    max_backoff: float = 10.0
    # Who this runner is, sent with every call: the API's list of workers shows it by name,
    # host and pid (GET /api/workers/).
    runner_name: str = ""
    http: httpx.Client = field(init=False, repr=False)
    _backoff: tenacity.wait.wait_base = field(init=False, repr=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        if self.runner_name:
            headers |= {
                "X-Runner-Name": self.runner_name,
                "X-Runner-Host": socket.gethostname(),
                "X-Runner-Pid": str(os.getpid()),
            }
        self.http = httpx.Client(
            base_url=self.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
        )
        # 0.5 s doubling up to max_backoff, plus up to 1 s at random so that runners cut off
        # together do not all come back in the same instant.
        self._backoff = tenacity.wait_exponential(
            multiplier=0.5, max=self.max_backoff
        ) + tenacity.wait_random(0, 1)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.http.close()

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        give_up: Callable[[], bool] = _never,
        max_seconds: float | None = None,
    ) -> Any:
        """Send one call, retried with the same body until it gets a final answer, for at
        most `max_seconds` (default `max_retry_seconds`) or until `give_up()` is true.
        Raises AuthRefused, ApiError (a final error answer) or ApiUnreachable."""
        budget = self.max_retry_seconds if max_seconds is None else max_seconds
        tries: list[BaseException] = []  # the errors that were retried
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_worth_retrying),
            stop=tenacity.stop_any(tenacity.stop_before_delay(budget), lambda _: give_up()),
            wait=self._wait,
            sleep=_sleeper(give_up),
            before_sleep=lambda state: tries.append(self._log_retry(method, path, state)),
            reraise=True,
        )
        try:
            return retrying(self._send, method, path, body or {})
        except _GiveUp:
            raise ApiUnreachable(f"stopped retrying; last: {tries[-1]}") from None
        except ApiError as exc:
            if _worth_retrying(exc):  # still unavailable when the budget ran out
                raise ApiUnreachable(f"no final answer in time; last: {exc}") from exc
            exc.retried = any(isinstance(error, ApiUnreachable) for error in tries)
            raise

    def _send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except UNREACHABLE as exc:
            raise ApiUnreachable(f"{type(exc).__name__}: {exc}") from exc
        if response.is_success:
            return response.json() if response.content else None
        try:
            detail = response.json()
        except ValueError:
            detail = response.text[:500]
        error_class = AuthRefused if response.status_code in AUTH_STATUSES else ApiError
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        raise error_class(response.status_code, detail, retry_after=retry_after)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """The server's Retry-After when it gave one, else exponential backoff with jitter."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, ApiError) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_seconds)
        return float(self._backoff(state))

    def _log_retry(self, method: str, path: str, state: tenacity.RetryCallState) -> BaseException:
        error = state.outcome.exception() if state.outcome else None
        assert error is not None  # only failed tries are retried
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s %s failed (%s); retrying in %.1f s (try %d)",
            method,
            path,
            error,
            delay,
            state.attempt_number,
        )
        return error


@dataclass
class Work:
    """What to do with one task: a registered handler, or a command fed the data on stdin."""

    handler: Handler | None = None
    command: list[str] | None = None
    timeout: float | None = None

    def run(self, task: dict[str, Any], is_cancelled: Callable[[], bool]) -> Any:
        if self.handler is not None:
            context = TaskContext(
                task_id=uuid.UUID(task["id"]),
                scheduler_id=task["scheduler"],
                data=task["data"],
                attempt=task["attempts"],
                is_cancelled=is_cancelled,
            )
            return self.handler.func(context)
        return self._run_command(task, is_cancelled)

    def _run_command(self, task: dict[str, Any], is_cancelled: Callable[[], bool]) -> Any:
        env = {
            "TASK_ID": task["id"],
            "TASK_ATTEMPT": str(task["attempts"]),
            "TASK_SCHEDULER": task["scheduler"],
        }
        process = subprocess.Popen(
            self.command or [],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            text=True,
        )
        output: dict[str, tuple[str, str]] = {}
        feeder = threading.Thread(
            target=lambda: output.update(out=process.communicate(json.dumps(task["data"])))
        )
        feeder.start()
        while feeder.is_alive():
            feeder.join(0.2)
            if is_cancelled():
                process.terminate()
                feeder.join(5)
                if feeder.is_alive():  # it ignores SIGTERM
                    process.kill()
                    feeder.join()
                raise TaskCancelled("cancelled while the command ran")
        stdout, stderr = output["out"]
        if process.returncode != 0:
            raise RuntimeError(f"exit code {process.returncode}: {stderr.strip()[-2000:]}")
        try:
            return json.loads(stdout) if stdout.strip() else None
        except ValueError:
            return {"stdout": stdout[-10000:]}


@dataclass(frozen=True)
class Lease:
    """What a runner holds of a popped task, sent back unchanged with every call about it."""

    task_id: str
    attempt: int
    token: str | None  # None from a server that hands out no lease tokens

    @classmethod
    def of(cls, task: dict[str, Any]) -> Lease:
        return cls(task["id"], task["attempts"], task.get("lease_token"))

    @property
    def path(self) -> str:
        return f"/api/tasks/{self.task_id}/"

    def body(self, **fields: Any) -> dict[str, Any]:
        token = {"lease_token": self.token} if self.token else {}
        return {**fields, "attempt": self.attempt, **token}


@dataclass
class PullRunner:
    client: ApiClient
    scheduler_id: str
    work: Work
    name: str = "runner"
    poll_interval: float = 1.0
    # Long poll: each pop waits this long for work on the server (0: pop, then sleep
    # poll_interval). Woken by the push itself, so a task reaches a waiting runner at once.
    wait: float = 20.0
    heartbeat_seconds: float = 10.0
    grace_seconds: float = 30.0
    max_tasks: int | None = None
    # Above 1: pop this many at once, start them all and report them all in one request each
    # (POST /api/tasks/report/), running them one after another in between. For short tasks:
    # a task waiting its turn in the batch is not heartbeaten, so the whole batch must finish
    # within the queue's lease_seconds (a task whose lease ran out is handed out again and
    # this runner's late report of it is refused by its lease token).
    batch: int = 1
    # How long the hand-back on the way out may be retried: the runner is leaving.
    hand_back_seconds: float = 10.0
    stopping: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    stopped_at: float | None = None
    refused: AuthRefused | None = None  # the heartbeat thread's, raised by the main loop
    _last_pop_answered: bool = False

    def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.stopping.set()

    def past_grace(self) -> bool:
        """Stopping, and the grace period is over: time to give up on calls too."""
        return self.stopped_at is not None and (
            time.monotonic() >= self.stopped_at + self.grace_seconds
        )

    def run(self) -> int:
        """Pop and process tasks until stopped (or max_tasks done); returns tasks processed.
        Raises AuthRefused when the API refuses the token."""
        while not self.stopping.is_set():
            room = self.batch if self.max_tasks is None else self.max_tasks - self.done
            if room <= 0:
                break
            tasks = self._pop(min(room, self.batch))
            if not tasks:
                if not (self.wait and self._last_pop_answered):
                    self.stopping.wait(self.poll_interval)
                continue
            if self.batch > 1:
                self._run_batch(tasks)
            else:
                self.process(tasks[0])
                self.done += 1
            if self.refused is not None:
                raise self.refused
        return self.done

    def _pop(self, limit: int = 1) -> list[dict[str, Any]]:
        path = f"/api/schedulers/{self.scheduler_id}/pop/"
        body: dict[str, Any] = (
            {"limit": limit, "wait": self.wait} if self.wait else {"limit": limit}
        )
        self._last_pop_answered = False
        try:
            popped = self.client.call("POST", path, body, give_up=self.stopping.is_set)
        except AuthRefused:
            raise
        except (ApiError, ApiUnreachable) as exc:
            # A pop whose answer was lost leaves its task leased to nobody: the lease runs
            # out and the reaper hands it out again.
            logger.warning("pop failed: %s", exc)
            return []
        self._last_pop_answered = True  # an empty long poll may be sent again at once
        return popped["results"]

    def _run_batch(self, tasks: list[dict[str, Any]]) -> None:
        """Start every task in one request, run those that started one after another, and
        report them in one request; on SIGTERM the ones not yet run are handed back."""
        leases = [Lease.of(task) for task in tasks]
        started = self._report_many([lease.body(status="RUNNING") for lease in leases], leases)
        finished: list[tuple[Lease, dict[str, Any]]] = []
        for task, lease in zip(tasks, leases, strict=True):
            if lease.task_id not in started:
                continue
            if self.stopping.is_set():
                self._hand_back(lease)
                continue
            span = {"scheduler.task.id": lease.task_id, "scheduler.runner": self.name}
            with tracing.task_span("runner.task", task.get("traceparent"), **span):
                outcome = self._run_held(task, lease)
            if "handed_back" not in outcome:  # SIGTERM's grace ran out: it went back
                finished.append((lease, outcome))
                self.done += 1
        bodies = [self._final_body(lease, outcome) for lease, outcome in finished]
        self._report_many(bodies, [lease for lease, _ in finished])

    def _report_many(self, bodies: list[dict[str, Any]], leases: list[Lease]) -> set[str]:
        """POST /api/tasks/report/ with one report per lease; the ids it accepted."""
        if not bodies:
            return set()
        reports = [
            {"id": lease.task_id, **body} for lease, body in zip(leases, bodies, strict=True)
        ]
        try:
            answer = self.client.call(
                "POST", "/api/tasks/report/", {"reports": reports}, give_up=self.past_grace
            )
        except AuthRefused:
            raise
        except (ApiError, ApiUnreachable) as exc:
            logger.error(
                "batch report of %d tasks failed (%s): their leases run out", len(reports), exc
            )
            return set()
        accepted = set()
        for result in answer["results"]:
            if result["status"] == 200:
                accepted.add(result["id"])
            else:
                logger.warning("report of task %s refused: %s", result["id"], result.get("detail"))
        return accepted

    def process(self, task: dict[str, Any]) -> str:
        # In the task's trace (its `traceparent`, from the push): the start, heartbeat and
        # report calls carry it, so the server's spans of them join that trace too.
        span = {"scheduler.task.id": str(task.get("id")), "scheduler.runner": self.name}
        with tracing.task_span("runner.task", task.get("traceparent"), **span):
            return self._process(task)

    def _process(self, task: dict[str, Any]) -> str:
        lease = Lease.of(task)
        if not self._start(lease):
            return "skipped"
        outcome = self._run_held(task, lease)
        if "handed_back" in outcome:
            return str(outcome["handed_back"])
        return self._report(lease, outcome)

    def _run_held(self, task: dict[str, Any], lease: Lease) -> dict[str, Any]:
        """Run a started task with its heartbeat; its outcome (result, or error and
        traceback), or `handed_back` when SIGTERM's grace ran out first."""
        cancelled = threading.Event()
        # Threads start in an empty context: each gets a copy of this one (the task's span).
        beat = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._heartbeat, lease, cancelled),
            daemon=True,
        )
        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._work, task, cancelled, outcome),
            daemon=True,
        )
        beat.start()
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if self.stopping.is_set() and worker.is_alive():
                worker.join(self.grace_seconds)
                if worker.is_alive():
                    cancelled.set()
                    try:
                        return {"handed_back": self._hand_back(lease)}
                    finally:
                        # Let the work see the cancel and stop: a command is terminated, not
                        # left running after the runner exits. A handler that never checks
                        # is abandoned.
                        worker.join(10)
        cancelled.set()  # stops the heartbeat
        return outcome

    def _start(self, lease: Lease) -> bool:
        """DISPATCHED -> RUNNING; a task that cannot be started is handed back or skipped."""
        try:
            self.client.call(
                "PATCH", lease.path, lease.body(status="RUNNING"), give_up=self.stopping.is_set
            )
        except AuthRefused:
            raise
        except ApiError as exc:
            if exc.landed("RUNNING"):
                logger.info("task %s was already RUNNING: an earlier try started it", lease.task_id)
                return True
            logger.info("task %s not started: %s", lease.task_id, exc)
            return False
        except ApiUnreachable as exc:
            logger.warning("task %s not started: %s", lease.task_id, exc)
            self._hand_back(lease)
            return False
        return True

    def _work(
        self, task: dict[str, Any], cancelled: threading.Event, outcome: dict[str, Any]
    ) -> None:
        try:
            outcome["result"] = self.work.run(task, cancelled.is_set)
        except Exception as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["traceback"] = traceback.format_exc()

    def _heartbeat(self, lease: Lease, cancelled: threading.Event) -> None:
        while not cancelled.wait(self.heartbeat_seconds):
            try:
                self.client.call(
                    "POST", f"{lease.path}heartbeat/", lease.body(), give_up=cancelled.is_set
                )
            except AuthRefused as exc:
                self.refused = exc  # the main loop raises it once the work has stopped
                cancelled.set()
            except ApiError as exc:
                if exc.status == 409:  # cancelled, or the lease was taken back: stop the work
                    logger.info("heartbeat refused: %s", exc.body)
                    cancelled.set()
                else:
                    logger.warning("heartbeat failed: %s", exc)
            except ApiUnreachable as exc:
                logger.warning("heartbeat failed: %s", exc)

    @staticmethod
    def _final_body(lease: Lease, outcome: dict[str, Any]) -> dict[str, Any]:
        if "error" in outcome:
            return lease.body(
                status="FAILED",
                error=outcome["error"][:10000],
                traceback=outcome.get("traceback", "")[-64000:],
            )
        return lease.body(status="COMPLETED", result=outcome.get("result"))

    def _report(self, lease: Lease, outcome: dict[str, Any]) -> str:
        body = self._final_body(lease, outcome)
        try:
            # After SIGTERM a report is still worth its grace period, not more.
            self.client.call("PATCH", lease.path, body, give_up=self.past_grace)
        except AuthRefused:
            raise
        except ApiError as exc:
            if exc.landed(body["status"]):
                logger.warning(
                    "task %s was already %s: an earlier try of this report landed and only its "
                    "answer was lost; not reported again (%s)",
                    lease.task_id,
                    body["status"],
                    exc.body,
                )
                return body["status"].lower()
            retried = " after a retry" if exc.retried else ""
            logger.warning("report refused%s: %s", retried, exc)
            return "refused"
        except ApiUnreachable as exc:
            logger.error(
                "could not report task %s %s (%s): its lease runs out and the queue hands it "
                "out again",
                lease.task_id,
                body["status"],
                exc,
            )
            return "unreported"
        return body["status"].lower()

    def _hand_back(self, lease: Lease) -> str:
        body = lease.body(reason=f"{self.name} stopping")
        try:
            self.client.call(
                "POST", f"{lease.path}release/", body, max_seconds=self.hand_back_seconds
            )
        except AuthRefused:
            raise
        except ApiError as exc:
            if exc.landed("QUEUED"):
                logger.info("task %s was already handed back by an earlier try", lease.task_id)
                return "handed back"
            logger.warning("hand back refused: %s", exc)
            return "refused"
        except ApiUnreachable as exc:
            logger.warning(
                "could not hand task %s back (%s): its lease runs out and the reaper takes it back",
                lease.task_id,
                exc,
            )
            return "not handed back"
        return "handed back"
