"""The pull runner: pops tasks of a scheduler over the REST API, heartbeats, runs a registered
handler or an operator's command, and reports the result. On SIGTERM it stops popping, lets the
current task finish within a grace period, and otherwise hands it back (attempt not spent)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.registry import Handler, TaskCancelled, TaskContext

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class ApiClient:
    base_url: str
    token: str
    timeout: float = 30.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.base_url.rstrip("/") + path,
            data=json.dumps(body or {}).encode(),
            method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                detail = json.loads(payload)
            except ValueError:
                detail = payload.decode(errors="replace")[:500]
            raise ApiError(exc.code, detail) from None


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


@dataclass
class PullRunner:
    client: ApiClient
    scheduler_id: str
    work: Work
    name: str = "runner"
    poll_interval: float = 1.0
    heartbeat_seconds: float = 10.0
    grace_seconds: float = 30.0
    max_tasks: int | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    done: int = 0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Pop and process tasks until stopped (or max_tasks done); returns tasks processed."""
        while not self.stopping.is_set():
            if self.max_tasks is not None and self.done >= self.max_tasks:
                break
            try:
                popped = self.client.call(
                    "POST", f"/api/schedulers/{self.scheduler_id}/pop/", {"limit": 1}
                )
            except (ApiError, OSError) as exc:
                logger.warning("pop failed: %s", exc)
                self.stopping.wait(self.poll_interval)
                continue
            if not popped["results"]:
                self.stopping.wait(self.poll_interval)
                continue
            self.process(popped["results"][0])
            self.done += 1
        return self.done

    def process(self, task: dict[str, Any]) -> str:
        path, attempt = f"/api/tasks/{task['id']}/", task["attempts"]
        try:
            self.client.call("PATCH", path, {"status": "RUNNING", "attempt": attempt})
        except ApiError as exc:
            logger.info("task %s not started: %s", task["id"], exc)
            return "skipped"
        cancelled = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(path, attempt, cancelled), daemon=True
        )
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=self._work, args=(task, cancelled, outcome), daemon=True)
        beat.start()
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if self.stopping.is_set() and worker.is_alive():
                worker.join(self.grace_seconds)
                if worker.is_alive():
                    cancelled.set()
                    handed = self._hand_back(path, attempt)
                    # Let the work see the cancel and stop: a command is terminated, not left
                    # running after the runner exits. A handler that never checks is abandoned.
                    worker.join(10)
                    return handed
        cancelled.set()  # stops the heartbeat
        return self._report(path, attempt, outcome)

    def _work(
        self, task: dict[str, Any], cancelled: threading.Event, outcome: dict[str, Any]
    ) -> None:
        try:
            outcome["result"] = self.work.run(task, cancelled.is_set)
        except Exception as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    def _heartbeat(self, path: str, attempt: int, cancelled: threading.Event) -> None:
        while not cancelled.wait(self.heartbeat_seconds):
            try:
                self.client.call("POST", f"{path}heartbeat/", {"attempt": attempt})
            except ApiError as exc:
                if exc.status == 409:  # cancelled, or the lease was taken back: stop the work
                    logger.info("heartbeat refused: %s", exc.body)
                    cancelled.set()
            except OSError as exc:
                logger.warning("heartbeat failed: %s", exc)

    def _report(self, path: str, attempt: int, outcome: dict[str, Any]) -> str:
        if "error" in outcome:
            body = {"status": "FAILED", "error": outcome["error"][:10000], "attempt": attempt}
        else:
            body = {"status": "COMPLETED", "result": outcome.get("result"), "attempt": attempt}
        try:
            self.client.call("PATCH", path, body)
        except ApiError as exc:
            logger.warning("report refused: %s", exc)
            return "refused"
        return body["status"].lower()

    def _hand_back(self, path: str, attempt: int) -> str:
        try:
            self.client.call(
                "POST", f"{path}release/", {"attempt": attempt, "reason": f"{self.name} stopping"}
            )
        except ApiError as exc:
            logger.warning("hand back refused: %s", exc)
            return "refused"
        return "handed back"
