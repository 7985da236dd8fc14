from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import CommandParser

from schedules import services
from tasks.management.commands._base import OurCommand


class Command(OurCommand):
    help = (
        "Run the orchestrator: turn due schedules into tasks, per scheduler, up to each queue's "
        "room, shared among its weighted policies. --once runs one tick and exits; without it "
        "the command ticks every --interval seconds until SIGTERM/SIGINT, reporting each "
        "tick on stderr. Safe to run beside beat's periodic tick and other runners: an "
        "occurrence becomes at most one task."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="One tick, then exit; its result on stdout."
        )
        parser.add_argument("--scheduler", metavar="ID", help="Only this queue.")
        parser.add_argument(
            "--json", action="store_true", help="With --once: the result as one JSON document."
        )
        parser.add_argument("--interval", type=float, default=5.0, help="Seconds between ticks.")
        parser.add_argument(
            "--batch-size", type=int, default=500, help="Schedules per transaction."
        )

    def handle(
        self,
        *args: Any,
        once: bool,
        scheduler: str | None,
        interval: float,
        batch_size: int,
        **_: Any,
    ) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        if not once:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        while True:
            created = services.orchestrate(scheduler_id=scheduler, batch_size=max(batch_size, 1))
            total = sum(created.values())
            detail = ", ".join(f"{sid}: {n}" for sid, n in sorted(created.items()) if n)
            line = f"tick: {total} tasks created" + (f" ({detail})" if detail else "")
            if once:
                self.result({"created": total, "per_scheduler": created}, line)
                return
            self.note(line)  # progress of a long-running process, like its logs
            if stopping:
                return
            deadline = time.monotonic() + interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(min(0.2, interval))
            if stopping:
                return
