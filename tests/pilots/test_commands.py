"""`manage.py ce` (list, drain/ban/activate, submit, create/update/delete), `manage.py vo`
(create/update) and `manage.py pilots` (list, show, report --store); refusals and bad arguments
are CommandErrors, checked as the API checks them."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from time_machine import TimeMachineFixture

from pilots.models import (
    CEStatus,
    ComputeElement,
    PilotReport,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)
from tasks.models import Scheduler
from tests.pilots.helpers import T0, make_ce, make_pilot, make_vo

C, P = CEStatus, PilotStatus
pytestmark = pytest.mark.django_db


def run(*args: str, command: str = "pilots") -> str:
    out = StringIO()
    call_command(command, *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def ce(*args: str) -> str:
    return run(*args, command="ce")


def vo(*args: str) -> str:
    return run(*args, command="vo")


def test_ce_list__status_capacity_active_free_and_vos() -> None:
    a = make_ce("ce-a", capacity=4, vos=["lhcb", "atlas"])
    make_pilot(a, status=P.RUNNING)
    make_pilot(a, status=P.DONE)
    make_ce("ce-b", capacity=2, status=C.DRAINING)

    lines = ce("list").splitlines()

    assert lines[0].split() == [
        "name", "status", "capacity", "active_pilots", "free_slots", "vos", "backend"
    ]  # fmt: skip
    assert lines[2].split() == ["ce-a", "ACTIVE", "4", "1", "3", "atlas,", "lhcb", "simulated"]
    assert lines[3].split() == ["ce-b", "DRAINING", "2", "0", "2", "lhcb", "simulated"]
    rows = json.loads(ce("list", "--json"))
    assert [(r["name"], r["active_pilots"], r["free_slots"], r["vos"]) for r in rows] == [
        ("ce-a", 1, 3, ["atlas", "lhcb"]),
        ("ce-b", 0, 2, ["lhcb"]),
    ]


def test_ce_drain_ban_activate__move_the_ce() -> None:
    a = make_ce("ce-a", capacity=3)
    submitted = make_pilot(a, status=P.SUBMITTED)

    assert ce("drain", "ce-a").strip() == "ce-a: DRAINING"
    assert ce("ban", "ce-a").strip() == "ce-a: BANNED"
    failed = PilotSubmission.objects.get(id=submitted.id)
    assert (failed.status, failed.failure_reason) == (P.FAILED, "CE ce-a banned by cli")
    assert json.loads(ce("activate", "ce-a", "--json"))["status"] == C.ACTIVE
    assert ComputeElement.objects.get().status == C.ACTIVE


def test_ce_submit__prints_the_pilot() -> None:
    make_ce("ce-a", capacity=1)

    out = ce("submit", "ce-a", "--vo", "lhcb")

    pilot = PilotSubmission.objects.get()
    assert out.strip() == f"pilot {pilot.id}: SUBMITTED {pilot.external_id}"


def test_ce_submit__failed_submission_prints_the_reason() -> None:
    make_ce("ce-a", capacity=1, reliability=0.0)

    out = ce("submit", "ce-a", "--vo", "lhcb")

    assert "FAILED submission failed: simulated submission refused by the CE" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("ce", "submit", "ce-a", "--vo", "lhcb"), "full"),
        (("ce", "submit", "ce-a", "--vo", "nobody"), "does not serve"),
        (("ce", "submit", "ce-nope", "--vo", "lhcb"), "HTTP equivalent: 404"),
        (("ce", "drain", "ce-nope"), "does not exist"),
        (("ce", "ban", "ce-nope"), "HTTP equivalent: 404"),
        (("ce", "submit", "ce-a"), "--vo"),
        (("ce", "drain"), "NAME"),
        (("ce", "delete", "ce-a"), "has pilots on record"),
        (("pilots", "list", "--status", "LOST"), "invalid choice"),
        (("pilots", "show", "0000"), "No pilot id is or starts with '0000'"),
        (("pilots", "explode"), "invalid choice"),
        (("pilots",), "ACTION"),
    ],
)
def test_pilots__errors_are_command_errors(args: tuple[str, ...], needle: str) -> None:
    a = make_ce("ce-a", capacity=1)
    make_pilot(a, status=P.RUNNING)

    with pytest.raises(CommandError) as caught:
        run(*args[1:], command=args[0])

    assert needle in str(caught.value)
    assert PilotSubmission.objects.count() == 1


def test_pilots_list__newest_first_with_filters(clock: TimeMachineFixture) -> None:
    a = make_ce("ce-a", capacity=5, vos=["lhcb", "atlas"])
    b = make_ce("ce-b", capacity=5)
    old = make_pilot(a, "lhcb", status=P.DONE, submitted_at=T0)
    mid = make_pilot(a, "atlas", status=P.FAILED, submitted_at=T0.replace(hour=11))
    new = make_pilot(b, "lhcb", status=P.RUNNING, submitted_at=T0.replace(hour=12))

    def ids(*args: str) -> list[str]:
        return [row["id"] for row in json.loads(run("list", *args, "--json"))]

    assert ids() == [str(new.id), str(mid.id), str(old.id)]
    assert ids("--ce", "ce-a") == [str(mid.id), str(old.id)]
    assert ids("--vo", "lhcb") == [str(new.id), str(old.id)]
    assert ids("--status", "FAILED") == [str(mid.id)]
    assert ids("--limit", "1") == [str(new.id)]
    assert ids("--limit", "0") == [str(new.id)]
    assert ids("--ce", "nowhere") == []
    assert "2030-01-01T11:05:00Z" in run("list", "--status", "FAILED")
    assert json.loads(run("show", str(mid.id)[:8], "--json"))["vo"] == "atlas"


def test_pilots_report__prints_counts_and_stores_only_with_store() -> None:
    ce = make_ce("ce-a", capacity=5)
    make_pilot(ce, status=P.RUNNING)
    make_pilot(ce, status=P.DONE)
    expected = {
        "by_status": {"SUBMITTED": 0, "RUNNING": 1, "DONE": 1, "FAILED": 0},
        "by_ce": {"ce-a": {"RUNNING": 1, "DONE": 1}},
        "by_vo": {"lhcb": {"RUNNING": 1, "DONE": 1}},
    }

    assert json.loads(run("report", "--json")) == expected
    assert not PilotReport.objects.exists()
    assert run("report").splitlines()[2].split() == ["all", "-", "0", "1", "1", "0"]
    assert json.loads(run("report", "--store", "--json")) == expected
    report = PilotReport.objects.get()
    assert (report.by_status, report.by_ce, report.by_vo) == tuple(expected.values())


def test_scheduler_delete__a_system_queue_is_refused_naming_the_rule() -> None:
    with pytest.raises(CommandError, match="system queues cannot be deleted"):
        call_command("scheduler", "delete", "pilots-check-pilots", stdout=StringIO())

    assert Scheduler.objects.filter(id="pilots-check-pilots").exists()


def test_vo_create_update__as_the_api() -> None:
    assert vo("create", "cms").strip() == "created VO cms"
    assert VirtualOrganisation.objects.get(name="cms").enabled
    assert json.loads(vo("update", "cms", "--enabled", "no", "--json"))["enabled"] is False
    assert not VirtualOrganisation.objects.get(name="cms").enabled
    assert [row["name"] for row in json.loads(vo("list", "--json"))] == ["cms"]
    assert json.loads(vo("show", "cms", "--json"))["enabled"] is False


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("create", "cms"), "NAME: virtual organisation with this name already exists"),
        (("create", "bad name"), "NAME: Use 1-100 letters"),
        (("update", "cms"), "Nothing to change: give at least one of --enabled"),
        (("update", "nope", "--enabled", "no"), "VO 'nope' does not exist"),
        (("update", "cms", "--enabled", "maybe"), "invalid choice"),
    ],
)
def test_vo__refusals_change_nothing(args: tuple[str, ...], needle: str) -> None:
    make_vo("cms")
    with pytest.raises(CommandError, match=needle):
        vo(*args)
    assert list(VirtualOrganisation.objects.values_list("name", "enabled")) == [("cms", True)]


def test_ce_create_update_delete__as_the_api() -> None:
    make_vo("lhcb")
    make_vo("atlas")

    out = ce("create", "ce-n", "--capacity", "4", "--reliability", "0.5", "--vos", "lhcb", "atlas")

    assert out.strip() == "created CE ce-n"
    made = ComputeElement.objects.get(name="ce-n")
    assert (made.capacity, made.reliability, made.status) == (4, 0.5, C.ACTIVE)
    assert sorted(made.vos.values_list("name", flat=True)) == ["atlas", "lhcb"]
    shown = json.loads(ce("update", "ce-n", "--capacity", "2", "--vos", "atlas", "--json"))
    assert (shown["capacity"], shown["vos"], shown["free_slots"]) == (2, ["atlas"], 2)
    ce("update", "ce-n", "--vos")  # no names: serves no VO
    assert not ComputeElement.objects.get(name="ce-n").vos.exists()
    assert ce("delete", "ce-n").strip() == "deleted CE ce-n"
    assert not ComputeElement.objects.filter(name="ce-n").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("create", "ce-a"), "NAME: compute element with this name already exists"),
        (("create", "ce-b", "--vos", "nobody"), "--vos: Object with name=nobody does not exist"),
        (("create", "ce-b", "--capacity", "-1"), "--capacity"),
        (("create", "ce-b", "--reliability", "2"), "--reliability"),
        (
            ("create", "ce-b", "--backend", "local", "--backend-settings", '{"command": "rm"}'),
            "--backend-settings: command: 'rm' is not the name of one of the server's",
        ),
        (("create", "ce-b", "--backend-settings", "[1]"), "--backend-settings: must be a JSON"),
        (("update", "ce-a"), "Nothing to change"),
        (("update", "ce-a", "--capacity", "many"), "is not an integer"),
        (("update", "ce-nope", "--capacity", "3"), "Compute element 'ce-nope' does not exist"),
        (("delete", "ce-nope"), "HTTP equivalent: 404"),
    ],
)
def test_ce__refusals_change_nothing(args: tuple[str, ...], needle: str) -> None:
    make_ce("ce-a", capacity=1)
    with pytest.raises(CommandError) as caught:
        ce(*args)
    assert needle in str(caught.value)
    assert list(ComputeElement.objects.values_list("name", "capacity")) == [("ce-a", 1)]
