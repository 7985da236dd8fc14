from __future__ import annotations

import os
import shlex
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasks.exceptions import QueueError
from tasks.pull_runner import ApiClient, PullRunner, Work
from tasks.registry import get_handler


class Command(BaseCommand):
    help = (
        "A pull runner: pops tasks of a scheduler over the REST API, heartbeats while it works, "
        "runs a registered handler (--handler) or a command (--command; the task's data is "
        "its stdin as JSON, TASK_ID/TASK_ATTEMPT in its environment, JSON on stdout is the "
        "result, a non-zero exit a failure), and reports COMPLETED or FAILED. A cancelled "
        "task is stopped. On SIGTERM/SIGINT it stops popping, lets the current task finish "
        "within --grace seconds, else hands it back to the queue (attempt not spent)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--api-url", default=os.environ.get("SCHEDULER_API_URL", "http://127.0.0.1:8000")
        )
        parser.add_argument(
            "--token",
            default=os.environ.get("SCHEDULER_API_TOKEN"),
            help="Runner token (or SCHEDULER_API_TOKEN).",
        )
        parser.add_argument("--scheduler", required=True)
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--handler", help="A registered handler name, e.g. demo.echo.")
        what.add_argument("--command", help='A command line, e.g. "python3 scan.py".')
        parser.add_argument("--poll-interval", type=float, default=1.0)
        parser.add_argument(
            "--heartbeat", type=float, default=10.0, help="Seconds between heartbeats."
        )
        parser.add_argument(
            "--grace", type=float, default=30.0, help="Seconds to finish on SIGTERM."
        )
        parser.add_argument("--max-tasks", type=int, help="Exit after this many tasks.")
        parser.add_argument("--name", default=f"runner-{os.getpid()}")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["token"]:
            raise CommandError("--token (or SCHEDULER_API_TOKEN) is required.")
        try:
            handler = get_handler(options["handler"]) if options["handler"] else None
        except QueueError as exc:
            raise CommandError(exc.message) from None
        command = shlex.split(options["command"]) if options["command"] else None
        runner = PullRunner(
            client=ApiClient(options["api_url"], options["token"]),
            scheduler_id=options["scheduler"],
            work=Work(handler=handler, command=command),
            name=options["name"],
            poll_interval=options["poll_interval"],
            heartbeat_seconds=options["heartbeat"],
            grace_seconds=options["grace"],
            max_tasks=options["max_tasks"],
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        self.stdout.write(
            f"{runner.name}: pulling from {options['scheduler']} at {options['api_url']}"
        )
        done = runner.run()
        self.stdout.write(f"{runner.name}: stopped after {done} tasks")
