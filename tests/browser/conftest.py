"""Browser tests: Debian's headless Chromium (/usr/bin/chromium, never a downloaded browser)
driven by Playwright against pytest-django's live server (a real server on loopback, a
transactional database).

Playwright's sync API keeps an asyncio event loop running in the test thread while the browser
is open, and Django refuses ORM calls from a thread with a running loop
(SynchronousOnlyOperation). The ORM calls here are plain synchronous code that never runs
inside that loop, so DJANGO_ALLOW_ASYNC_UNSAFE is set, for this package only: the browser and
the variable live in package-scoped fixtures, closed and restored before the next package's
tests run (a session-scoped browser would leave the loop running under the whole suite).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pilots import services as pilot_services
from pilots.models import CEStatus, ComputeElement, VirtualOrganisation
from schedules import services as schedule_services
from tasks import services as task_services
from tasks.workers import worker_seen

# Real Celery worker and beat processes for the health banner's test (the e2e package's).
from tests.e2e.conftest import broker_url, start_beat, start_worker  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # the suite may run as root (CI containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No outbound connections: the tests need none, and machines without internet log noise.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}
# The README's pictures are refreshed on purpose (UPDATE_SCREENSHOTS=1 make test); an ordinary
# run writes them to a scratch folder, so tests leave the work tree as they found it.
SCREENSHOTS = (
    Path(__file__).resolve().parents[2] / "docs" / "screenshots"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / f"scheduler-screenshots-{os.getpid()}"
)
ADMIN_USERNAME = "operator"
ADMIN_PASSWORD = "correct-horse-battery-staple"  # a test account's, in the test database


@pytest.fixture(scope="package")
def _orm_beside_playwright() -> Iterator[None]:
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="package")
def browser(_orm_beside_playwright: None) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = (
            f"BROWSER TESTS NOT RUN: {CHROMIUM} is missing. Install Debian's chromium "
            "(apt-get install chromium); .ci/run does. With CI=true this is a failure."
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, live_server: Any) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, base_url=live_server.url)
    context.set_default_timeout(15_000)
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture
def admin_user(transactional_db: None) -> User:
    return User.objects.create_superuser(
        username=ADMIN_USERNAME, email="operator@example.org", password=ADMIN_PASSWORD
    )


@pytest.fixture
def log_in(admin_user: User) -> Callable[[Page], None]:
    """Log in through the real admin login form; the admin index shows."""

    def log_in_page(page: Page) -> None:
        page.goto("/admin/login/?next=/admin/")
        page.fill("#id_username", ADMIN_USERNAME)
        page.fill("#id_password", ADMIN_PASSWORD)
        page.click("#login-form input[type=submit]")
        expect(page.locator("#content h1")).to_have_text("Site administration")

    return log_in_page


@pytest.fixture
def screenshot() -> Callable[[Page, str], Path]:
    """Save a full-page screenshot as NAME.png in SCREENSHOTS (docs/screenshots/ with
    UPDATE_SCREENSHOTS=1: the README shows those)."""

    def save(page: Page, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save


# --- demo-like data, written through the services -------------------------------------------

QUEUES: dict[str, dict[str, Any]] = {
    "boefje-org0": {"description": "Boefjes (scans) of organisation 0"},
    "boefje-org1": {"description": "Boefjes (scans) of organisation 1"},
    "boefje-org2": {"description": "Boefjes (scans) of organisation 2"},
    "normalizer": {"description": "Normalise raw boefje output", "dead_letter": False},
}
SCHEDULES: list[tuple[str, str, dict[str, Any]]] = [
    ("boefje-org0", "org0-dns", {"interval_seconds": 3600}),
    ("boefje-org0", "org0-nmap-nightly", {"cron": "30 2 * * *", "timezone": "Europe/Amsterdam"}),
    ("boefje-org0", "org0-certificates", {"interval_seconds": 6 * 3600}),
    ("boefje-org1", "org1-dns", {"interval_seconds": 3600}),
    ("boefje-org1", "org1-web", {"cron": "15 * * * *"}),
    ("boefje-org2", "org2-dns", {"interval_seconds": 1800}),
    ("boefje-org2", "org2-ports", {"interval_seconds": 3600}),
    ("normalizer", "normalizer-rollup", {"cron": "*/30 * * * *"}),
]
BOEFJES = ["dns-records", "nmap", "ssl-certificates", "security-txt", "webpage-analysis"]
ERRORS = [
    "nmap: host unreachable (timed out after 300 s)",
    "dns-records: SERVFAIL from the resolver",
    "ssl-certificates: TLS handshake failed",
    "raw file not found in the bytes store",
]
# (name, capacity, VOs): simulated CEs with reliability 1, so every submission succeeds and
# every pilot that ran ends DONE; the outcomes differ by time only.
CES = [
    ("ce-cern", 6, ["lhcb", "atlas"]),
    ("ce-in2p3", 4, ["atlas"]),
    ("ce-nikhef", 4, ["lhcb"]),
    ("ce-ral", 3, ["atlas"]),
]
CE_TIMING = {"start_after_seconds": 60, "run_seconds": 900}


def _at(moment: datetime) -> Any:
    return time_machine.travel(moment, tick=False)


def _work_round(rng: random.Random, hour: int) -> None:
    """What an hour of runners does: the tick makes the due schedules' tasks, boefjes push
    more, runners pop them all, most complete, some fail (DEAD, or FAILED on `normalizer`)."""
    schedule_services.orchestrate()
    load = 1 + math.sin(2 * math.pi * (hour - 9) / 24)  # busy by day, quiet at night
    for scheduler_id in QUEUES:
        pushed_at = timezone.now()
        for _ in range(round(2 * load) + rng.randint(0, 1)):
            org = scheduler_id.rsplit("-", 1)[-1]
            task_services.task_push(
                scheduler_id=scheduler_id,
                data={"organisation": org, "boefje": rng.choice(BOEFJES)},
                priority=rng.choice([0, 0, 10, 50]),
                actor="rocky",
            )
        # Runners come by a while later: the queue wait the charts show.
        with _at(pushed_at + timedelta(seconds=rng.uniform(0.5, 20 + 60 * load))):
            _run_all(rng, scheduler_id)


def _run_all(rng: random.Random, scheduler_id: str) -> None:
    for task in task_services.task_pop(scheduler_id=scheduler_id, limit=1000, worker="r1"):
        if rng.random() < 0.05:
            task_services.task_fail(task_id=task.id, error=rng.choice(ERRORS), actor="r1")
        else:
            changed = rng.random() < 0.3
            task_services.task_complete(task_id=task.id, result={"changed": changed}, actor="r1")


def _seed_tasks(now: datetime, rng: random.Random) -> None:
    with _at(now - timedelta(hours=24, minutes=5)):
        for scheduler_id, fields in QUEUES.items():
            task_services.scheduler_create(id=scheduler_id, retry_policy="none", **fields)
        for scheduler_id, hash_, fields in SCHEDULES:
            schedule_services.schedule_create(
                scheduler_id=scheduler_id,
                hash=hash_,
                data={"organisation": scheduler_id.rsplit("-", 1)[-1], "schedule": hash_},
                actor="operator",
                **fields,
            )
    for hours_ago in range(23, -1, -1):
        moment = now - timedelta(hours=hours_ago, seconds=30)
        with _at(moment):
            _work_round(rng, moment.hour)
        if hours_ago == 1:
            # A queue paused 40 minutes ago: its schedules are overdue, its pushes queue up.
            with _at(now - timedelta(minutes=40)):
                task_services.scheduler_set_paused(
                    scheduler_id="boefje-org2", paused=True, actor="operator"
                )
    # Now: work waiting (QUEUED), handed out (DISPATCHED) and running (RUNNING). The paused
    # queue gets pushes of its own: the hourly rounds push next to nothing at night (their
    # load follows the hour), and its bar must show whatever time the suite runs.
    with _at(now):
        waiting = [("boefje-org0", 14), ("boefje-org1", 8), ("boefje-org2", 3), ("normalizer", 5)]
        for scheduler_id, queued in waiting:
            for n in range(queued):
                task_services.task_push(
                    scheduler_id=scheduler_id,
                    data={"organisation": scheduler_id, "boefje": BOEFJES[n % len(BOEFJES)]},
                    actor="rocky",
                )
        for scheduler_id, dispatched, running in [("boefje-org0", 5, 3), ("normalizer", 2, 2)]:
            popped = task_services.task_pop(
                scheduler_id=scheduler_id, limit=dispatched, worker="r2"
            )
            for task in popped[:running]:
                task_services.task_start(task_id=task.id, actor="r2")
        # A schedule created just now: due at once, not yet overdue.
        schedule_services.schedule_create(
            scheduler_id="boefje-org1",
            hash="org1-new-domain",
            interval_seconds=3600,
            data={"organisation": "org1", "domain": "example.org"},
            actor="operator",
        )


def _check_pilots() -> None:
    for vo in ("lhcb", "atlas"):
        pilot_services.check_pilots_for_vo(vo_name=vo)


def _submit(ce: str, vo: str, n: int) -> None:
    for _ in range(n):
        pilot_services.pilot_submit(ce_name=ce, vo_name=vo, actor="submit_pilots")


def _seed_pilots(now: datetime) -> None:
    with _at(now - timedelta(hours=1)):
        vos = {name: VirtualOrganisation.objects.create(name=name) for name in ("lhcb", "atlas")}
        for name, capacity, served in CES:
            ce = ComputeElement.objects.create(
                name=name, capacity=capacity, reliability=1.0, backend_settings=CE_TIMING
            )
            ce.vos.set([vos[vo] for vo in served])
    with _at(now - timedelta(minutes=40)):  # a first wave: DONE by now
        _submit("ce-cern", "lhcb", 4)
        _submit("ce-cern", "atlas", 2)
        _submit("ce-in2p3", "atlas", 3)
        _submit("ce-nikhef", "lhcb", 4)
        _submit("ce-ral", "atlas", 2)
    with _at(now - timedelta(minutes=15)):
        _check_pilots()
        pilot_services.pilot_report_create()
    with _at(now - timedelta(minutes=10)):  # a second wave: RUNNING by now
        _submit("ce-cern", "lhcb", 3)
        _submit("ce-cern", "atlas", 1)
        _submit("ce-in2p3", "atlas", 2)
        _submit("ce-nikhef", "lhcb", 3)
    with _at(now):
        _check_pilots()
        _submit("ce-cern", "atlas", 2)  # just submitted: SUBMITTED
        _submit("ce-in2p3", "atlas", 1)
        _submit("ce-ral", "atlas", 3)
        # Banning fails its SUBMITTED pilots.
        pilot_services.ce_set_status(name="ce-ral", to_status=CEStatus.BANNED, actor="operator")
        pilot_services.pilot_report_create()


def _seed_workers(now: datetime) -> None:
    """A Celery worker, two pull runners and beat, seen just now; and beat's jobs."""
    call_command("setup_periodic_tasks", verbosity=0)
    with _at(now):
        worker_seen(kind="celery", name="celery@worker-1", host="worker-1", pid=4711,
                    queues=["celery"], started=True)  # fmt: skip
        for name, queues, held in [
            ("runner-a", ["boefje-org0"], 3),
            ("runner-b", ["boefje-org1"], 0),
        ]:
            worker_seen(kind="runner", name=name, host="scanner-1", pid=812, queues=queues,
                        tasks_held=held, account="boefjes", started=True)  # fmt: skip
        worker_seen(kind="beat", name="beat@scheduler-1", host="scheduler-1", pid=99, started=True)


@pytest.fixture
def demo_data(transactional_db: None) -> datetime:
    """Four pull queues with 24 hours of history, schedules (one due just now, a paused
    queue's overdue), and pilots on four simulated CEs in every state. Returns "now"."""
    now = timezone.now()
    rng = random.Random(20240611)  # the same data every run
    _seed_tasks(now, rng)
    _seed_pilots(now)
    _seed_workers(now)
    return now
