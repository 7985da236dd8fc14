from __future__ import annotations

import argparse
import os
import shlex
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from scheduler_site import tracing
from tasks.exceptions import QueueError
from tasks.management.commands._base import OurCommand
from tasks.pull_runner import ApiClient, AuthRefused, PullRunner, Work
from tasks.registry import get_handler


class Command(OurCommand):
    help = (
        "A pull runner: pops tasks of a scheduler over the REST API, heartbeats while it works, "
        "runs a registered handler (--handler) or a command (--command; the task's data is "
        "its stdin as JSON, TASK_ID/TASK_ATTEMPT in its environment, JSON on stdout is the "
        "result, a non-zero exit a failure), and reports COMPLETED or FAILED. A cancelled "
        "task is stopped. On SIGTERM/SIGINT it stops popping, lets the current task finish "
        "within --grace seconds, else hands it back to the queue (attempt not spent). "
        "All calls share one kept-alive HTTP session. A call that gets no answer (connection "
        "refused or dropped, --timeout) or 502/503/504/429 is retried with exponential backoff "
        "and jitter (429: after its Retry-After) for up to --max-retry-seconds, with the same "
        "task, attempt and lease token, so the runner rides out a restart of the API; a report "
        "whose earlier try landed unanswered is not made twice. After SIGTERM, retries stop "
        "with the grace period. 401/403 stop the runner at once with exit code 1."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--api-url",
            default=os.environ.get("SCHEDULER_API_URL", "http://127.0.0.1:8000"),
            help="The scheduler's base URL (or SCHEDULER_API_URL).",
        )
        parser.add_argument(
            "--token",
            default=os.environ.get("SCHEDULER_API_TOKEN"),
            help="Runner token (default: $SCHEDULER_API_TOKEN, never shown here).",
        )
        parser.add_argument("--scheduler", required=True, metavar="ID", help="The queue.")
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument(
            "--handler",
            help="A registered handler name, e.g. demo.echo (this or --command is required).",
        )
        what.add_argument(
            "--command",
            help='A command line, e.g. "python3 scan.py" (this or --handler is required).',
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=20.0,
            help="Long poll: seconds each pop waits on the server for work (default: 20; the "
            "server allows up to 30; 0 pops and sleeps --poll-interval instead). A task pushed "
            "meanwhile reaches the waiting runner at once. Must be less than --timeout.",
        )
        parser.add_argument(
            "--poll-interval",
            type=float,
            default=1.0,
            help="Seconds between pops when --wait is 0, and after a failed pop (default: 1).",
        )
        parser.add_argument(
            "--heartbeat", type=float, default=10.0, help="Seconds between heartbeats."
        )
        parser.add_argument(
            "--grace", type=float, default=30.0, help="Seconds to finish on SIGTERM."
        )
        parser.add_argument(
            "--max-retry-seconds",
            type=_positive,
            default=300.0,
            help="How long one call is retried while the API is unreachable or unavailable "
            "(default: 300). A pop is then tried again after --poll-interval; a report given "
            "up leaves the task to its lease expiry.",
        )
        parser.add_argument(
            "--timeout",
            type=_positive,
            default=30.0,
            help="Seconds to wait for one answer before retrying (default: 30).",
        )
        parser.add_argument(
            "--batch",
            type=_batch_size,
            default=1,
            metavar="N",
            help="Pop up to N tasks at once, start and report them in one request each "
            "(POST /api/tasks/report/) and run them one after another (default: 1). The whole "
            "batch must finish within the queue's lease_seconds: only the running task is "
            "heartbeaten.",
        )
        parser.add_argument(
            "--max-tasks",
            type=int,
            metavar="N",
            help="Exit after this many tasks (default: never).",
        )
        parser.add_argument(
            "--name",
            default=f"runner-{os.getpid()}",
            help="This runner's name, sent with every call: GET /api/workers/ and the "
            "dashboard list it by it (default: runner-<pid>).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["token"]:
            raise CommandError("--token (or SCHEDULER_API_TOKEN) is required.")
        if not 0 <= options["wait"] < options["timeout"]:
            raise CommandError("--wait must be 0 or more and less than --timeout.")
        work = _work(options)
        tracing.setup("runner")  # before the client: httpx's instrumentation wraps new clients
        client = ApiClient(
            options["api_url"],
            options["token"],
            timeout=options["timeout"],
            max_retry_seconds=options["max_retry_seconds"],
            runner_name=options["name"],
        )
        with client:
            runner = PullRunner(
                client=client,
                scheduler_id=options["scheduler"],
                work=work,
                name=options["name"],
                poll_interval=options["poll_interval"],
                wait=options["wait"],
                heartbeat_seconds=options["heartbeat"],
                grace_seconds=options["grace"],
                max_tasks=options["max_tasks"],
                batch=options["batch"],
            )
            self._run(runner, options)

    def _run(self, runner: PullRunner, options: dict[str, Any]) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        self.note(f"{runner.name}: pulling from {options['scheduler']} at {options['api_url']}")
        try:
            done = runner.run()
        except AuthRefused as exc:
            raise CommandError(
                f"{runner.name}: the API refused the runner's token (HTTP {exc.status}: "
                f"{_detail(exc.body)}); not retrying. Check --token (or SCHEDULER_API_TOKEN) "
                f"and that its account is a runner allowed on {options['scheduler']}."
            ) from None
        self.note(f"{runner.name}: stopped after {done} tasks")


def _work(options: dict[str, Any]) -> Work:
    try:
        handler = get_handler(options["handler"]) if options["handler"] else None
    except QueueError as exc:
        raise CommandError(exc.message) from None
    command = shlex.split(options["command"]) if options["command"] else None
    return Work(handler=handler, command=command)


def _detail(body: Any) -> str:
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


def _batch_size(value: str) -> int:
    # the API's pop limit bounds a batch: a larger one would be refused on every pop
    if not value.isdigit() or not 1 <= int(value) <= settings.TASK_POP_MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a whole number from 1 to {settings.TASK_POP_MAX_LIMIT}"
        )
    return int(value)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds above 0")
    return number
