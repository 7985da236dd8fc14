"""What an operator watches and does in a browser (issue 13): the health banner turning red
when the Celery worker stops and green when it runs again, without reloading; a failed task's
traceback; the cron helper as you type; a button on the task page; the dashboard's range
picker. Headless Chromium against the live server, real worker and beat processes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from playwright.sync_api import Page, expect

from scheduler_site import dashboard
from tasks import dispatch, execution, services, stats
from tasks.models import Task, TaskStatus
from tests.support.processes import BeatProcess, WorkerProcess

pytestmark = pytest.mark.browser

LogIn = Callable[[Page], None]
Screenshot = Callable[[Page, str], Path]


def test_health_banner__red_when_the_worker_stops_green_when_it_runs(
    page: Page,
    log_in: LogIn,
    start_worker: Callable[..., WorkerProcess],
    start_beat: Callable[[], BeatProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "REFRESH_SECONDS", 1)  # the page's own refresh, sped up
    call_command("setup_periodic_tasks", verbosity=0)
    worker = start_worker("banner")
    start_beat()
    log_in(page)
    page.goto("/")
    banner = page.locator("#health")
    # Beat registers with its first periodic job (the dispatcher, every 2 s).
    expect(banner).to_have_attribute("data-status", "ok", timeout=30_000)
    expect(banner).to_contain_text("Healthy")
    loads = []
    page.on("load", lambda _: loads.append(1))

    worker.stop()
    expect(banner).to_have_attribute("data-status", "down", timeout=30_000)
    expect(banner).to_contain_text("celery workers down: no live Celery worker")
    expect(page.locator("#workers")).to_contain_text("stopped")

    start_worker("banner-again")
    expect(banner).to_have_attribute("data-status", "ok", timeout=30_000)
    assert loads == []  # the panels refreshed themselves: the page never reloaded


def test_task_page__a_failed_task_shows_its_traceback(
    page: Page, log_in: LogIn, screenshot: Screenshot
) -> None:
    services.scheduler_create(id="sleepy", kind="celery", handler="demo.sleep")
    task = services.task_push(scheduler_id="sleepy", data={"seconds": 0, "fail": "disk full"})
    dispatch.dispatch_scheduler("sleepy")
    assert execution.execute(task.id, 1, worker="w1") == "failed"
    log_in(page)
    page.goto(f"/admin/tasks/task/{task.id}/change/")
    trace = page.locator("pre.traceback")
    expect(trace).to_contain_text("Traceback (most recent call last):")
    expect(trace).to_contain_text('tasks/handlers.py", line')
    expect(trace).to_contain_text("RuntimeError: disk full")
    expect(page.locator(".field-error")).to_contain_text("RuntimeError: disk full")
    screenshot(page, "admin-task-traceback")


def test_task_page__the_requeue_button(
    page: Page, log_in: LogIn, scheduler_with_dead: Task
) -> None:
    log_in(page)
    page.goto(f"/admin/tasks/task/{scheduler_with_dead.id}/change/")
    expect(page.locator(".object-button-release")).to_have_count(0)
    page.locator(".object-button-requeue").click()
    expect(page.locator("ul.messagelist li.success")).to_have_text("Requeued: QUEUED.")
    expect(page.locator(".field-status")).to_contain_text("Queued")
    assert Task.objects.get(id=scheduler_with_dead.id).status == TaskStatus.QUEUED


@pytest.fixture
def scheduler_with_dead(transactional_db: None) -> Task:
    services.scheduler_create(id="scan", retry_policy="none")
    task = services.task_push(scheduler_id="scan", data={"org": "acme"})
    services.task_pop(scheduler_id="scan")
    return services.task_fail(task_id=task.id, error="nmap: host unreachable")


def test_schedule_form__the_cron_helper_as_you_type(
    page: Page, log_in: LogIn, screenshot: Screenshot
) -> None:
    services.scheduler_create(id="scan")
    log_in(page)
    page.goto("/admin/schedules/schedule/add/")
    preview = page.locator("#cron-preview")
    page.locator("#id_cron").press_sequentially("30 2 * * 1-5")
    expect(preview).to_contain_text("At 02:30 on Monday through Friday")
    expect(preview.locator("li")).to_have_count(5)
    expect(preview).to_contain_text("next runs (UTC)")
    # The time zone from the searchable select: the runs are shown in its offset.
    page.locator(".field-timezone .select2-selection").click()
    page.locator(".select2-search__field").fill("Amsterdam")
    page.locator(".select2-results__option", has_text="Europe/Amsterdam").click()
    expect(preview).to_contain_text("next runs (Europe/Amsterdam)")
    expect(preview.locator("li").first).to_contain_text("02:30:00+0")
    screenshot(page, "admin-schedule-cron-helper")
    page.locator("#id_cron").fill("61 * * * *")
    expect(preview).to_have_attribute("data-state", "error")
    expect(preview).to_contain_text("is not valid")


def test_dashboard__the_range_picker_redraws_the_charts(
    page: Page, log_in: LogIn, demo_data: datetime, screenshot: Screenshot
) -> None:
    stats.queue_stats_rollup(backfill=timedelta(days=2))
    log_in(page)
    page.goto("/")
    throughput = page.locator("#throughput-chart")
    expect(throughput).to_have_attribute("data-points", "60")  # 1 h per minute, the default
    page.get_by_role("button", name="7d").click()
    expect(throughput).to_have_attribute("data-range", "7d")
    expect(throughput).to_have_attribute("data-points", "168")
    expect(page.get_by_role("button", name="7d")).to_have_attribute("aria-pressed", "true")
    expect(page).to_have_url("/?range=7d")
    page.get_by_role("button", name="24h").click()
    expect(page.locator("#wait-chart")).to_have_attribute("data-points", "96")
    expect(page.locator("#wait-chart canvas")).to_be_visible()
    page.goto("/queues/boefje-org0/?range=24h")
    expect(page.locator("#queue-summary")).to_contain_text("Queue boefje-org0")
    expect(page.locator("#throughput-chart")).to_have_attribute("data-points", "96")
    screenshot(page, "queue-page")
