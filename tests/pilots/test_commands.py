"""`manage.py pilots`: list CEs, drain/ban/activate, submit, list pilots, report (--store);
refusals and bad arguments are CommandErrors."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from time_machine import TimeMachineFixture

from pilots.models import CEStatus, ComputeElement, PilotReport, PilotStatus, PilotSubmission
from tasks.models import Scheduler
from tests.pilots.helpers import T0, make_ce, make_pilot

C, P = CEStatus, PilotStatus
pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("pilots", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_pilots_ces__lists_status_capacity_active_free_and_vos() -> None:
    ce = make_ce("ce-a", capacity=4, vos=["lhcb", "atlas"])
    make_pilot(ce, status=P.RUNNING)
    make_pilot(ce, status=P.DONE)
    make_ce("ce-b", capacity=2, status=C.DRAINING)

    lines = run("ces").splitlines()

    assert lines[0].split() == ["name", "status", "cap", "active", "free", "VOs"]
    assert lines[1].split() == ["ce-a", "ACTIVE", "4", "1", "3", "atlas,lhcb"]
    assert lines[2].split() == ["ce-b", "DRAINING", "2", "0", "2", "lhcb"]


def test_pilots_drain_ban_activate__move_the_ce() -> None:
    ce = make_ce("ce-a", capacity=3)
    submitted = make_pilot(ce, status=P.SUBMITTED)

    assert run("drain", "ce-a").strip() == "ce-a: DRAINING"
    assert run("ban", "ce-a").strip() == "ce-a: BANNED"
    failed = PilotSubmission.objects.get(id=submitted.id)
    assert (failed.status, failed.failure_reason) == (P.FAILED, "CE ce-a banned by cli")
    assert run("activate", "ce-a").strip() == "ce-a: ACTIVE"
    assert ComputeElement.objects.get().status == C.ACTIVE


def test_pilots_submit__prints_the_pilot() -> None:
    make_ce("ce-a", capacity=1)

    out = run("submit", "ce-a", "--vo", "lhcb")

    pilot = PilotSubmission.objects.get()
    assert out.strip() == f"pilot {pilot.id}: SUBMITTED {pilot.external_id}"


def test_pilots_submit__failed_submission_prints_the_reason() -> None:
    make_ce("ce-a", capacity=1, reliability=0.0)

    out = run("submit", "ce-a", "--vo", "lhcb")

    assert "FAILED submission failed: simulated submission refused by the CE" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("submit", "ce-a", "--vo", "lhcb"), "full"),
        (("submit", "ce-a", "--vo", "nobody"), "does not serve"),
        (("submit", "ce-nope", "--vo", "lhcb"), "HTTP equivalent: 404"),
        (("drain", "ce-nope"), "does not exist"),
        (("ban", "ce-nope"), "HTTP equivalent: 404"),
        (("submit", "ce-a"), "--vo"),
        (("drain",), "ce"),
        (("list", "--status", "LOST"), "invalid choice"),
        (("explode",), "invalid choice"),
        ((), "ACTION"),
    ],
)
def test_pilots__errors_are_command_errors(args: tuple[str, ...], needle: str) -> None:
    ce = make_ce("ce-a", capacity=1)
    make_pilot(ce, status=P.RUNNING)

    with pytest.raises(CommandError) as caught:
        run(*args)

    assert needle in str(caught.value)
    assert PilotSubmission.objects.count() == 1


def test_pilots_list__newest_first_with_filters(clock: TimeMachineFixture) -> None:
    a = make_ce("ce-a", capacity=5, vos=["lhcb", "atlas"])
    b = make_ce("ce-b", capacity=5)
    old = make_pilot(a, "lhcb", status=P.DONE, submitted_at=T0)
    mid = make_pilot(a, "atlas", status=P.FAILED, submitted_at=T0.replace(hour=11))
    new = make_pilot(b, "lhcb", status=P.RUNNING, submitted_at=T0.replace(hour=12))

    def ids(*args: str) -> list[str]:
        return [line.split()[0] for line in run("list", *args).splitlines()]

    assert ids() == [str(new.id), str(mid.id), str(old.id)]
    assert ids("--ce", "ce-a") == [str(mid.id), str(old.id)]
    assert ids("--vo", "lhcb") == [str(new.id), str(old.id)]
    assert ids("--status", "FAILED") == [str(mid.id)]
    assert ids("--limit", "1") == [str(new.id)]
    assert ids("--limit", "0") == [str(new.id)]
    assert ids("--ce", "nowhere") == []
    assert "2030-01-01 11:05:00" in run("list", "--status", "FAILED")


def test_pilots_report__prints_counts_and_stores_only_with_store() -> None:
    ce = make_ce("ce-a", capacity=5)
    make_pilot(ce, status=P.RUNNING)
    make_pilot(ce, status=P.DONE)
    expected = {
        "by_status": {"SUBMITTED": 0, "RUNNING": 1, "DONE": 1, "FAILED": 0},
        "by_ce": {"ce-a": {"RUNNING": 1, "DONE": 1}},
        "by_vo": {"lhcb": {"RUNNING": 1, "DONE": 1}},
    }

    assert json.loads(run("report")) == expected
    assert not PilotReport.objects.exists()
    assert json.loads(run("report", "--store")) == expected
    report = PilotReport.objects.get()
    assert (report.by_status, report.by_ce, report.by_vo) == tuple(expected.values())


def test_scheduler_delete__a_system_queue_is_refused_naming_the_rule() -> None:
    with pytest.raises(CommandError, match="system queues cannot be deleted"):
        call_command("scheduler", "delete", "pilots-check-pilots", stdout=StringIO())

    assert Scheduler.objects.filter(id="pilots-check-pilots").exists()
