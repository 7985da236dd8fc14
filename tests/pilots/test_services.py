"""The pilots services: submitting under the CE's capacity (all VOs counted), CE states,
the cycles' work (push submit_pilot tasks, advance pilots, report), starting cycles, the
system queues created on migrate and the demo command."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from pytest_django.fixtures import Settings
from time_machine import TimeMachineFixture

from pilots import jobs, queues, services
from pilots.models import (
    CEStatus,
    ComputeElement,
    PilotReport,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)
from tasks import services as task_services
from tasks.exceptions import TransitionRefused
from tasks.models import Scheduler, Task, TaskStatus
from tasks.registry import HANDLERS
from tests.pilots.helpers import T0, active_on, fresh, make_ce, make_pilot, make_vo

C, P, S = CEStatus, PilotStatus, TaskStatus
SEC = timedelta(seconds=1)
pytestmark = pytest.mark.django_db


def _later(clock: TimeMachineFixture, seconds: float) -> None:
    clock.move_to(T0 + timedelta(seconds=seconds), tick=False)


# --- pilot_submit ----------------------------------------------------------------------------


def test_pilot_submit__creates_a_submitted_pilot_with_its_external_id(
    clock: TimeMachineFixture,
) -> None:
    make_ce("ce-a", capacity=1)

    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb", actor="alice")

    pilot = fresh(pilot)
    assert (pilot.ce.name, pilot.vo.name, pilot.status) == ("ce-a", "lhcb", P.SUBMITTED)
    assert pilot.external_id == f"sim-{pilot.id.hex[:12]}"
    assert pilot.submitted_at == pilot.last_seen_at == T0
    assert (pilot.started_at, pilot.finished_at, pilot.failure_reason) == (None, None, "")


def test_pilot_submit__full_ce_refused_counting_every_vo() -> None:
    ce = make_ce("ce-a", capacity=2, vos=["lhcb", "atlas"])
    make_pilot(ce, "atlas", status=P.SUBMITTED)
    make_pilot(ce, "atlas", status=P.RUNNING)
    make_pilot(ce, "lhcb", status=P.DONE)
    make_pilot(ce, "lhcb", status=P.FAILED)

    with pytest.raises(services.NoFreeSlot) as caught:
        services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    assert caught.value.http_status == 409
    assert "full: 2 of 2" in caught.value.message
    assert PilotSubmission.objects.count() == 4


def test_pilot_submit__finished_pilots_free_their_slots() -> None:
    ce = make_ce("ce-a", capacity=2)
    first = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    with pytest.raises(services.NoFreeSlot):
        services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    PilotSubmission.objects.filter(id=first.id).update(status=P.DONE)

    assert services.free_slots(ce) == 1
    assert services.pilot_submit(ce_name="ce-a", vo_name="lhcb").status == P.SUBMITTED
    assert services.free_slots(ce) == 0


@pytest.mark.parametrize(
    ("arrange", "needle"),
    [
        (lambda: ComputeElement.objects.update(status=C.DRAINING), "is DRAINING"),
        (lambda: ComputeElement.objects.update(status=C.BANNED), "is BANNED"),
        (lambda: make_vo("atlas"), "does not serve an enabled VO 'atlas'"),
        (lambda: VirtualOrganisation.objects.update(enabled=False), "enabled VO 'atlas'"),
    ],
    ids=["draining", "banned", "vo-not-served", "vo-disabled"],
)
def test_pilot_submit__refused_with_409(arrange: Callable[[], object], needle: str) -> None:
    make_ce("ce-a", capacity=3, vos=["atlas"] if "disabled" in needle else ["lhcb"])
    arrange()

    with pytest.raises(services.NoFreeSlot) as caught:
        services.pilot_submit(ce_name="ce-a", vo_name="atlas")

    assert caught.value.http_status == 409
    assert needle in caught.value.message
    assert not PilotSubmission.objects.exists()


def test_pilot_submit__unknown_vo_or_ce() -> None:
    make_ce("ce-a")

    with pytest.raises(services.NoFreeSlot):
        services.pilot_submit(ce_name="ce-a", vo_name="nobody")
    with pytest.raises(services.PilotNotFound) as caught:
        services.pilot_submit(ce_name="ce-nope", vo_name="lhcb")

    assert caught.value.http_status == 404
    assert not PilotSubmission.objects.exists()


def test_pilot_submit__failed_submission_fails_the_pilot_and_frees_the_slot(
    clock: TimeMachineFixture,
) -> None:
    ce = make_ce("ce-a", capacity=1, reliability=0.0)

    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    assert pilot.status == P.FAILED
    assert pilot.failure_reason == "submission failed: simulated submission refused by the CE"
    assert (pilot.external_id, pilot.finished_at) == ("", T0)
    assert services.free_slots(ce) == 1
    ComputeElement.objects.filter(id=ce.id).update(reliability=1.0)
    assert services.pilot_submit(ce_name="ce-a", vo_name="lhcb").status == P.SUBMITTED


@pytest.mark.parametrize("command", ["touch {marker}", ["touch", "{marker}"]])
def test_pilot_submit__a_stored_command_line_is_never_run(
    var_dir: Path, command: str | list[str]
) -> None:
    """A CE saved before commands came only from PILOT_LOCAL_COMMANDS (or written to the
    table directly): its pilot fails at submission and nothing runs."""
    marker = var_dir / "ran"
    filled = (
        command.format(marker=marker)
        if isinstance(command, str)
        else [part.format(marker=marker) for part in command]
    )
    make_ce("ce-a", backend="local", backend_settings={"command": filled})

    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    assert pilot.status == P.FAILED
    assert "PILOT_LOCAL_COMMANDS" in pilot.failure_reason
    assert not (var_dir / "pilots").exists() or not any((var_dir / "pilots").iterdir())
    assert not marker.exists()


# --- ce_set_status ---------------------------------------------------------------------------


def test_ce_set_status__drain_ban_activate_in_any_order() -> None:
    make_ce("ce-a")

    for to in [C.DRAINING, C.BANNED, C.DRAINING, C.ACTIVE, C.BANNED, C.ACTIVE]:
        ce = services.ce_set_status(name="ce-a", to_status=to, actor="op")
        assert ce.status == to == ComputeElement.objects.get(name="ce-a").status


def test_ce_set_status__same_status_is_a_no_op(clock: TimeMachineFixture) -> None:
    ce = make_ce("ce-a")
    _later(clock, 60)

    again = services.ce_set_status(name="ce-a", to_status=C.ACTIVE)

    assert again.status == C.ACTIVE
    assert again.modified_at == ce.modified_at == T0


def test_ce_set_status__illegal_target_refused() -> None:
    make_ce("ce-a")

    with pytest.raises(TransitionRefused) as caught:
        services.ce_set_status(name="ce-a", to_status="DELETED")

    assert caught.value.http_status == 409
    assert caught.value.current_status == C.ACTIVE
    assert ComputeElement.objects.get(name="ce-a").status == C.ACTIVE


def test_ce_set_status__unknown_ce_is_404() -> None:
    with pytest.raises(services.PilotNotFound):
        services.ce_set_status(name="ce-nope", to_status=C.BANNED)


def test_ce_set_status__ban_fails_submitted_pilots_only(clock: TimeMachineFixture) -> None:
    ce = make_ce("ce-a", capacity=5)
    other = make_ce("ce-b", capacity=5)
    submitted = make_pilot(ce, status=P.SUBMITTED)
    running = make_pilot(ce, status=P.RUNNING)
    elsewhere = make_pilot(other, status=P.SUBMITTED)
    _later(clock, 60)

    services.ce_set_status(name="ce-a", to_status=C.BANNED, actor="alice")

    submitted = fresh(submitted)
    assert submitted.status == P.FAILED
    assert submitted.failure_reason == "CE ce-a banned by alice"
    assert submitted.finished_at == T0 + timedelta(seconds=60)
    assert fresh(running).status == P.RUNNING
    assert fresh(elsewhere).status == P.SUBMITTED
    assert active_on("ce-a") == 1


def test_ce_set_status__drain_leaves_pilots_alone() -> None:
    ce = make_ce("ce-a", capacity=5)
    submitted = make_pilot(ce, status=P.SUBMITTED)

    services.ce_set_status(name="ce-a", to_status=C.DRAINING)

    assert fresh(submitted).status == P.SUBMITTED


def test_check_pilots__draining_ce_pilots_still_advance(clock: TimeMachineFixture) -> None:
    make_ce("ce-a", backend_settings={"start_after_seconds": 1, "run_seconds": 10})
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    services.ce_set_status(name="ce-a", to_status=C.DRAINING)

    _later(clock, 2)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.RUNNING: 1}
    _later(clock, 20)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.DONE: 1}
    assert fresh(pilot).status == P.DONE


# --- submit_pilots_for_vo --------------------------------------------------------------------


def _submit_tasks() -> list[Task]:
    return list(Task.objects.filter(scheduler_id=services.SUBMIT_ONE_QUEUE).order_by("created_at"))


def test_submit_pilots_for_vo__one_task_per_free_slot_counting_all_vos() -> None:
    shared = make_ce("ce-shared", capacity=4, vos=["lhcb", "atlas"])
    make_ce("ce-own", capacity=2, vos=["lhcb"])
    make_pilot(shared, "atlas", status=P.RUNNING)
    make_pilot(shared, "lhcb", status=P.SUBMITTED)
    make_pilot(shared, "lhcb", status=P.DONE)

    pushed = services.submit_pilots_for_vo(vo_name="lhcb")

    assert pushed == {"ce-shared": 2, "ce-own": 2}
    tasks = _submit_tasks()
    assert sorted(t.data["ce"] for t in tasks) == ["ce-own"] * 2 + ["ce-shared"] * 2
    assert {(t.data["vo"], t.status, t.scheduler.handler) for t in tasks} == {
        ("lhcb", S.QUEUED, "pilots.submit_pilot")
    }
    assert all(set(t.data) == {"ce", "vo"} for t in tasks)


def test_submit_pilots_for_vo__already_queued_submissions_count() -> None:
    make_ce("ce-a", capacity=3, vos=["lhcb", "atlas"])
    task_services.task_push(
        scheduler_id=services.SUBMIT_ONE_QUEUE, data={"ce": "ce-a", "vo": "atlas"}
    )

    assert services.submit_pilots_for_vo(vo_name="lhcb") == {"ce-a": 2}
    assert services.submit_pilots_for_vo(vo_name="lhcb") == {}
    assert services.submit_pilots_for_vo(vo_name="atlas") == {}
    assert len(_submit_tasks()) == 3


def test_submit_pilots_for_vo__finished_submissions_do_not_count() -> None:
    make_ce("ce-a", capacity=1)
    task = task_services.task_push(
        scheduler_id=services.SUBMIT_ONE_QUEUE, data={"ce": "ce-a", "vo": "lhcb"}
    )
    task_services.task_cancel(task_id=task.id)

    assert services.submit_pilots_for_vo(vo_name="lhcb") == {"ce-a": 1}


def test_submit_pilots_for_vo__skips_draining_banned_and_full_ces() -> None:
    make_ce("ce-draining", capacity=2, status=C.DRAINING)
    make_ce("ce-banned", capacity=2, status=C.BANNED)
    full = make_ce("ce-full", capacity=1)
    make_pilot(full, status=P.RUNNING)
    make_ce("ce-atlas", capacity=2, vos=["atlas"])

    assert services.submit_pilots_for_vo(vo_name="lhcb") == {}
    assert _submit_tasks() == []


def test_submit_pilots_for_vo__disabled_or_unknown_vo_pushes_nothing() -> None:
    make_ce("ce-a", capacity=2)
    VirtualOrganisation.objects.filter(name="lhcb").update(enabled=False)

    assert services.submit_pilots_for_vo(vo_name="lhcb") == {}
    assert services.submit_pilots_for_vo(vo_name="nobody") == {}
    assert _submit_tasks() == []


# --- check_pilots_for_vo ---------------------------------------------------------------------

TIMING = {"start_after_seconds": 10, "run_seconds": 30}


def test_check_pilots__submitted_running_done(clock: TimeMachineFixture) -> None:
    make_ce("ce-a", backend_settings=TIMING)
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    _later(clock, 5)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {}
    assert fresh(pilot).status == P.SUBMITTED
    _later(clock, 10)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.RUNNING: 1}
    running = fresh(pilot)
    assert (running.status, running.started_at, running.last_seen_at) == (
        P.RUNNING,
        T0 + 10 * SEC,
        T0 + 10 * SEC,
    )
    _later(clock, 20)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {}
    assert fresh(pilot).last_seen_at == T0 + 20 * SEC
    _later(clock, 40)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.DONE: 1}
    done = fresh(pilot)
    assert (done.status, done.started_at, done.finished_at) == (
        P.DONE,
        T0 + 10 * SEC,
        T0 + 40 * SEC,
    )
    assert done.failure_reason == ""
    _later(clock, 50)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {}


def test_check_pilots__running_pilot_fails_by_reliability(clock: TimeMachineFixture) -> None:
    ce = make_ce("ce-a", backend_settings=TIMING)
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    _later(clock, 10)
    services.check_pilots_for_vo(vo_name="lhcb")
    ComputeElement.objects.filter(id=ce.id).update(reliability=0.0)

    _later(clock, 40)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.FAILED: 1}

    failed = fresh(pilot)
    assert (failed.status, failed.failure_reason) == (P.FAILED, "simulated pilot failure")
    assert failed.finished_at == T0 + 40 * SEC


def test_check_pilots__done_between_two_checks_records_running_too(
    clock: TimeMachineFixture,
) -> None:
    make_ce("ce-a", backend_settings=TIMING)
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    _later(clock, 100)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.DONE: 1}

    done = fresh(pilot)
    assert done.status == P.DONE
    assert done.started_at == done.finished_at == T0 + 100 * SEC


def test_check_pilots__only_the_vos_pilots(clock: TimeMachineFixture) -> None:
    make_ce("ce-a", capacity=4, vos=["lhcb", "atlas"], backend_settings=TIMING)
    lhcb = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    atlas = services.pilot_submit(ce_name="ce-a", vo_name="atlas")

    _later(clock, 15)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {P.RUNNING: 1}

    assert (fresh(lhcb).status, fresh(atlas).status) == (P.RUNNING, P.SUBMITTED)


def test_check_pilots__no_news_past_the_limit_is_lost(
    clock: TimeMachineFixture, settings: Settings, var_dir: Path
) -> None:
    settings.PILOT_LOST_AFTER_SECONDS = 300
    make_ce("ce-sim", capacity=3)
    make_ce("ce-local", capacity=3, backend="local")
    no_id = make_pilot(ComputeElement.objects.get(name="ce-sim"), external_id="")
    gone = make_pilot(
        ComputeElement.objects.get(name="ce-local"),
        status=P.RUNNING,
        external_id="0123abcd:999999999",
    )

    _later(clock, 300)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {}
    _later(clock, 301)
    assert services.check_pilots_for_vo(vo_name="lhcb") == {"lost": 2}

    for pilot in (no_id, gone):
        pilot = fresh(pilot)
        assert pilot.status == P.FAILED
        assert pilot.failure_reason == "lost: no news from the CE"
        assert pilot.finished_at == T0 + 301 * SEC


def test_check_pilots__news_keeps_a_pilot_from_being_lost(
    clock: TimeMachineFixture, settings: Settings
) -> None:
    settings.PILOT_LOST_AFTER_SECONDS = 300
    make_ce("ce-a", backend_settings={"start_after_seconds": 1, "run_seconds": 10_000})
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")

    for seconds in (200, 400, 600, 800):
        _later(clock, seconds)
        services.check_pilots_for_vo(vo_name="lhcb")

    assert fresh(pilot).status == P.RUNNING
    assert fresh(pilot).last_seen_at == T0 + 800 * SEC


# --- counts and reports ----------------------------------------------------------------------


def _arrange_counts() -> None:
    a = make_ce("ce-a", capacity=9, vos=["lhcb", "atlas"])
    b = make_ce("ce-b", capacity=9, vos=["lhcb"])
    for ce, vo, status in [
        (a, "lhcb", P.SUBMITTED),
        (a, "lhcb", P.SUBMITTED),
        (a, "atlas", P.RUNNING),
        (a, "atlas", P.DONE),
        (b, "lhcb", P.FAILED),
        (b, "lhcb", P.RUNNING),
    ]:
        make_pilot(ce, vo, status=status)


EXPECTED = {
    "by_status": {"SUBMITTED": 2, "RUNNING": 2, "DONE": 1, "FAILED": 1},
    "by_ce": {
        "ce-a": {"SUBMITTED": 2, "RUNNING": 1, "DONE": 1},
        "ce-b": {"FAILED": 1, "RUNNING": 1},
    },
    "by_vo": {
        "lhcb": {"SUBMITTED": 2, "FAILED": 1, "RUNNING": 1},
        "atlas": {"RUNNING": 1, "DONE": 1},
    },
}


def test_pilot_counts__per_status_ce_and_vo() -> None:
    _arrange_counts()

    assert services.pilot_counts() == EXPECTED


def test_pilot_counts__empty_lists_every_status_at_zero() -> None:
    assert services.pilot_counts() == {
        "by_status": {"SUBMITTED": 0, "RUNNING": 0, "DONE": 0, "FAILED": 0},
        "by_ce": {},
        "by_vo": {},
    }


def test_pilot_report_create__stores_the_counts(clock: TimeMachineFixture) -> None:
    _arrange_counts()

    report = services.pilot_report_create()

    stored = PilotReport.objects.get(id=report.id)
    assert {"by_status": stored.by_status, "by_ce": stored.by_ce, "by_vo": stored.by_vo} == EXPECTED
    assert stored.created_at == T0


# --- cycles ----------------------------------------------------------------------------------


def _cycle_tasks(queue_id: str) -> list[tuple[str | None, dict, str]]:
    rows = Task.objects.filter(scheduler_id=queue_id).order_by("created_at", "id")
    return [(t.hash, t.data, t.status) for t in rows]


def test_start_cycle__one_task_per_enabled_vo() -> None:
    for name, enabled in [("lhcb", True), ("atlas", True), ("old", False)]:
        make_vo(name, enabled=enabled)

    assert queues.start_cycle("submit_pilots") == ["atlas", "lhcb"]

    assert _cycle_tasks(services.SUBMIT_PILOTS_QUEUE) == [
        ("submit_pilots:atlas", {"vo": "atlas"}, S.QUEUED),
        ("submit_pilots:lhcb", {"vo": "lhcb"}, S.QUEUED),
    ]


def test_start_cycle__vo_whose_previous_task_is_active_is_skipped() -> None:
    make_vo("lhcb")
    make_vo("atlas")
    queues.start_cycle("check_pilots")
    previous = Task.objects.get(hash="check_pilots:lhcb")
    task_services.task_cancel(task_id=previous.id)

    assert queues.start_cycle("check_pilots") == ["lhcb"]
    assert queues.start_cycle("check_pilots") == []

    statuses = sorted((h, s) for h, _, s in _cycle_tasks(services.CHECK_PILOTS_QUEUE))
    assert statuses == [
        ("check_pilots:atlas", S.QUEUED),
        ("check_pilots:lhcb", S.CANCELLED),
        ("check_pilots:lhcb", S.QUEUED),
    ]


def test_start_cycle__check_pilots_also_for_a_disabled_vo_with_active_pilots(
    clock: TimeMachineFixture,
) -> None:
    ce = make_ce("ce-a", capacity=1, vos=["old", "idle"], backend_settings=TIMING)
    pilot = services.pilot_submit(ce_name="ce-a", vo_name="old")
    make_pilot(ce, "idle", status=P.DONE)
    VirtualOrganisation.objects.update(enabled=False)
    make_vo("lhcb")

    # Its pilot still holds the CE's only slot: the check must go on until it ends.
    assert queues.start_cycle("check_pilots") == ["lhcb", "old"]
    assert queues.start_cycle("submit_pilots") == ["lhcb"]
    _later(clock, 100)
    assert services.check_pilots_for_vo(vo_name="old") == {P.DONE: 1}
    assert fresh(pilot).status == P.DONE
    assert services.free_slots(ce) == 1


def test_start_cycle__pilot_report_is_one_class_level_task() -> None:
    make_vo("lhcb")
    make_vo("atlas")

    assert queues.start_cycle("pilot_report") == ["pilot_report"]
    assert queues.start_cycle("pilot_report") == []

    assert _cycle_tasks(services.REPORT_QUEUE) == [("pilot_report", {}, S.QUEUED)]


def test_start_cycle_job__runs_a_known_cycle_and_ignores_unknown_ones() -> None:
    make_vo("lhcb")

    assert jobs.start_cycle_job("check_pilots") == ["lhcb"]
    assert jobs.start_cycle_job("reboot_the_grid") == []
    assert Task.objects.count() == 1


def test_ensure_queues__the_four_system_queues_exist_after_migrate() -> None:
    expected = {
        "pilots-submit-pilots": "pilots.submit_pilots",
        "pilots-submit-pilot": "pilots.submit_pilot",
        "pilots-check-pilots": "pilots.check_pilots",
        "pilots-pilot-report": "pilots.pilot_report",
    }
    rows = Scheduler.objects.filter(id__startswith="pilots-")

    assert {s.id: s.handler for s in rows} == expected
    assert {s.kind for s in rows} == {"celery"}
    assert all(handler in HANDLERS for handler in expected.values())
    for handler in expected.values():
        assert HANDLERS[handler].retry.policy == "none"
        assert HANDLERS[handler].retry.dead_letter is False


def test_ensure_queues__marks_the_system_queues_also_those_made_before_the_flag() -> None:
    Scheduler.objects.filter(id="pilots-pilot-report").update(system=False)  # an older install
    Scheduler.objects.filter(id="pilots-check-pilots").delete()  # deleted before it was refused
    task_services.scheduler_create(id="mine", kind="celery", handler="pilots.submit_pilot")

    queues.ensure_queues()

    system = Scheduler.objects.filter(system=True).values_list("id", flat=True)
    assert sorted(system) == sorted(queue for queue, _ in queues.QUEUES)


def test_ensure_queues__idempotent_and_keeps_operator_changes() -> None:
    Scheduler.objects.filter(id="pilots-submit-pilot").update(dispatch_threshold=3)

    queues.ensure_queues()

    assert Scheduler.objects.filter(id__startswith="pilots-").count() == 4
    assert Scheduler.objects.get(id="pilots-submit-pilot").dispatch_threshold == 3


def test_setup_demo__two_vos_four_ces_once(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    first, second = StringIO(), StringIO()
    call_command("setup_demo", token_file=str(token_file), stdout=first)
    call_command("setup_demo", token_file=str(token_file), stdout=second)

    assert first.getvalue().count("created CE") == 4
    assert "created CE" not in second.getvalue()

    assert sorted(VirtualOrganisation.objects.values_list("name", flat=True)) == ["atlas", "lhcb"]
    ces = {ce.name: ce for ce in ComputeElement.objects.prefetch_related("vos")}
    assert sorted(ces) == ["ce-cern", "ce-flaky", "ce-nikhef", "ce-ral"]
    assert {vo.name for vo in ces["ce-cern"].vos.all()} == {"lhcb", "atlas"}
    assert {vo.name for vo in ces["ce-ral"].vos.all()} == {"atlas"}
    assert all(ce.status == C.ACTIVE and ce.backend == "simulated" for ce in ces.values())
    assert token_file.read_text()
