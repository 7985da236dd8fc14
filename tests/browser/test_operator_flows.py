"""What an operator does in a browser: log in to the admin, pause and resume a schedule, drain
a Compute Element, read the dashboard. Headless Chromium against the live server; the
screenshots the README shows are saved on the way (docs/screenshots/)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from pilots.models import CEStatus, ComputeElement
from schedules.models import Schedule, ScheduleStatus
from tasks import stats
from tasks.models import Task, TaskStatus

pytestmark = pytest.mark.browser

LogIn = Callable[[Page], None]
Screenshot = Callable[[Page, str], Path]


def _row(page: Page, pk: object) -> Locator:
    """The changelist row whose action checkbox selects the object `pk`."""
    checkbox = page.locator(f'input.action-select[value="{pk}"]')  # within the row
    return page.locator("#result_list tbody tr").filter(has=checkbox)


def _run_action(page: Page, pk: object, action_label: str) -> None:
    """Tick the object's checkbox, choose the action, click Go (the admin's own form)."""
    _row(page, pk).locator("input.action-select").check()
    page.select_option("select[name=action]", label=action_label)
    page.get_by_role("button", name="Go").click()


def _close_nav_sidebar(page: Page) -> None:
    """Fold the admin's navigation sidebar (as an operator would) so the table shows whole."""
    page.click("#toggle-nav-sidebar")
    expect(page.locator("#nav-sidebar")).to_have_attribute("aria-expanded", "false")


def test_log_in_through_the_admin_form(page: Page, log_in: LogIn) -> None:
    page.goto("/admin/")
    expect(page).to_have_url("/admin/login/?next=/admin/")  # not logged in yet
    log_in(page)
    expect(page).to_have_url("/admin/")
    expect(page.locator("#user-tools")).to_contain_text("operator")
    expect(page.locator("#schedules-schedule a")).to_have_text("Schedules")
    expect(page.locator("#pilots-computeelement a")).to_have_text("Compute elements")


def test_pause_and_resume_a_schedule_by_its_action(
    page: Page, log_in: LogIn, demo_data: datetime, screenshot: Screenshot
) -> None:
    schedule = Schedule.objects.get(scheduler_id="boefje-org0", hash="org0-dns")
    assert schedule.status == ScheduleStatus.ACTIVE
    log_in(page)
    page.goto("/admin/schedules/schedule/")
    _close_nav_sidebar(page)
    status = _row(page, schedule.pk).locator("td.field-status")
    expect(status).to_have_text(ScheduleStatus.ACTIVE.label)

    _run_action(page, schedule.pk, "Pause selected schedules")
    expect(page.locator("ul.messagelist li.success")).to_have_text("Paused 1.")
    expect(status).to_have_text(ScheduleStatus.PAUSED.label)
    schedule.refresh_from_db()
    assert schedule.status == ScheduleStatus.PAUSED
    assert schedule.deadline_at is None
    # Only the ticked one: the others are as they were.
    others = Schedule.objects.exclude(pk=schedule.pk)
    assert not others.filter(status=ScheduleStatus.PAUSED).exists()
    screenshot(page, "admin-schedules-paused")

    _run_action(page, schedule.pk, "Enable (resume) selected schedules")
    expect(page.locator("ul.messagelist li.success")).to_have_text("Resumed 1.")
    expect(status).to_have_text(ScheduleStatus.ACTIVE.label)
    schedule.refresh_from_db()
    assert schedule.status == ScheduleStatus.ACTIVE
    assert schedule.deadline_at is not None


def test_drain_a_compute_element(
    page: Page, log_in: LogIn, demo_data: datetime, screenshot: Screenshot
) -> None:
    ce = ComputeElement.objects.get(name="ce-nikhef")
    assert ce.status == CEStatus.ACTIVE
    log_in(page)
    page.goto("/admin/pilots/computeelement/")
    _close_nav_sidebar(page)
    status = _row(page, ce.pk).locator("td.field-status")
    expect(status).to_have_text(CEStatus.ACTIVE.label)

    _run_action(page, ce.pk, "Drain selected CEs (no new pilots; running ones finish)")
    expect(page.locator("ul.messagelist li.success")).to_have_text("Drained 1.")
    expect(status).to_have_text(CEStatus.DRAINING.label)
    # Its running pilots are untouched: they finish.
    expect(_row(page, ce.pk).locator("td.field-active")).to_have_text("3")
    ce.refresh_from_db()
    assert ce.status == CEStatus.DRAINING
    assert ComputeElement.objects.get(name="ce-cern").status == CEStatus.ACTIVE
    screenshot(page, "admin-compute-elements-drained")


BARS = """svg => Array.from(svg.querySelectorAll('rect'))
    .filter(r => r.querySelector('title'))  /* bars carry a tooltip; legend keys do not */
    .filter(r => { const b = r.getBoundingClientRect(); return b.width > 0 && b.height > 0; })
    .map(r => r.querySelector('title').textContent)"""


def test_dashboard_draws_its_charts(
    page: Page, log_in: LogIn, demo_data: datetime, screenshot: Screenshot
) -> None:
    queued = Task.objects.filter(scheduler_id="boefje-org0", status=TaskStatus.QUEUED).count()
    assert queued > 0
    stats.queue_stats_rollup(backfill=timedelta(hours=25))
    log_in(page)
    page.goto("/?range=24h")
    charts = page.locator("svg.chart")
    expect(charts).to_have_count(2)
    drawn: dict[str, list[str]] = {}
    for index in range(2):
        chart = charts.nth(index)
        expect(chart).to_be_visible()
        drawn[chart.get_attribute("aria-label") or str(index)] = chart.evaluate(BARS)
    depth, pilots = drawn.values()
    assert f"boefje-org0 QUEUED: {queued}" in depth
    assert any(bar.startswith("boefje-org0 RUNNING: ") for bar in depth)
    assert any(bar.startswith("boefje-org2 (paused) QUEUED: ") for bar in depth)
    for status in ("SUBMITTED", "RUNNING", "DONE", "FAILED"):
        assert any(f" {status}: " in bar for bar in pilots), status
    # uPlot's charts (canvas) of the 24 h range: 96 points of 15 minutes.
    for chart_id in ("throughput-chart", "wait-chart"):
        chart = page.locator(f"#{chart_id}")
        expect(chart).to_have_attribute("data-points", "96")
        expect(chart.locator("canvas")).to_be_visible()
    expect(page.locator("#schedules")).to_contain_text("boefje-org2/org2-dns")
    screenshot(page, "dashboard")
