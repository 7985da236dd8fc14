"""The pilots models: the CE and pilot state machines (allowed and refused moves) and the
validation full_clean applies (names, reliability in 0..1)."""

from __future__ import annotations

import itertools

import pytest
from django.core.exceptions import ValidationError

from pilots.models import (
    ACTIVE_PILOT_STATUSES,
    CE_TRANSITIONS,
    PILOT_TRANSITIONS,
    CEStatus,
    ComputeElement,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)
from tasks.exceptions import TransitionRefused
from tests.pilots.helpers import fresh, make_ce, make_pilot

C, P = CEStatus, PilotStatus

CE_ALLOWED = {
    (C.ACTIVE, C.DRAINING),
    (C.ACTIVE, C.BANNED),
    (C.DRAINING, C.ACTIVE),
    (C.DRAINING, C.BANNED),
    (C.BANNED, C.ACTIVE),
    (C.BANNED, C.DRAINING),
}
PILOT_ALLOWED = {
    (P.SUBMITTED, P.RUNNING),
    (P.SUBMITTED, P.FAILED),
    (P.RUNNING, P.DONE),
    (P.RUNNING, P.FAILED),
}


# --- state machines --------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(C.values, repeat=2)))
def test_ce_can_transition_to__follows_the_table(src: str, dst: str) -> None:
    ce = ComputeElement(name="ce", status=src)

    assert ce.can_transition_to(dst) is ((src, dst) in CE_ALLOWED)


def test_ce_can_transition_to__refuses_unknown_statuses() -> None:
    assert not ComputeElement(name="ce", status=C.ACTIVE).can_transition_to("DELETED")
    assert not ComputeElement(name="ce", status="WEIRD").can_transition_to(C.ACTIVE)


def test_ce_transitions__table_covers_every_status() -> None:
    assert set(CE_TRANSITIONS) == set(C.values)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(P.values, repeat=2)))
def test_pilot_can_transition_to__follows_the_table(src: str, dst: str) -> None:
    pilot = PilotSubmission(status=src)

    assert pilot.can_transition_to(dst) is ((src, dst) in PILOT_ALLOWED)


def test_pilot_transitions__final_states_are_final_and_active_ones_are_not() -> None:
    assert set(PILOT_TRANSITIONS) == set(P.values)
    assert {P.SUBMITTED, P.RUNNING} == ACTIVE_PILOT_STATUSES
    for status in (P.DONE, P.FAILED):
        assert PILOT_TRANSITIONS[status] == frozenset()
    # Nothing goes back to SUBMITTED; DONE is only reached through RUNNING.
    assert all(P.SUBMITTED not in targets for targets in PILOT_TRANSITIONS.values())
    assert [src for src, targets in PILOT_TRANSITIONS.items() if P.DONE in targets] == [P.RUNNING]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("reliability", [0.0, 0.5, 1.0])
def test_ce_full_clean__accepts_reliability_within_0_and_1(reliability: float) -> None:
    ComputeElement(name="ce-ok", capacity=0, reliability=reliability).full_clean()


@pytest.mark.django_db
@pytest.mark.parametrize("reliability", [-0.1, -1.0, 1.0001, 2.0])
def test_ce_full_clean__refuses_reliability_outside_0_and_1(reliability: float) -> None:
    with pytest.raises(ValidationError) as caught:
        ComputeElement(name="ce-bad", reliability=reliability).full_clean()

    assert set(caught.value.message_dict) == {"reliability"}


@pytest.mark.django_db
def test_ce_full_clean__refuses_a_negative_capacity() -> None:
    with pytest.raises(ValidationError) as caught:
        ComputeElement(name="ce-bad", capacity=-1).full_clean()

    assert set(caught.value.message_dict) == {"capacity"}


BAD_NAMES = ["", "-lead", ".dot", "has space", "slash/name", "ünïcode", "x" * 101, "semi;colon"]
GOOD_NAMES = ["a", "ce-cern.ch", "LHCb_2", "9x", "x" * 100]


@pytest.mark.django_db
@pytest.mark.parametrize("name", BAD_NAMES)
def test_names__bad_ones_refused_for_vos_and_ces(name: str) -> None:
    with pytest.raises(ValidationError) as vo_error:
        VirtualOrganisation(name=name).full_clean()
    with pytest.raises(ValidationError) as ce_error:
        ComputeElement(name=name).full_clean()

    assert set(vo_error.value.message_dict) == {"name"}
    assert set(ce_error.value.message_dict) == {"name"}


@pytest.mark.django_db
@pytest.mark.parametrize("name", GOOD_NAMES)
def test_names__good_ones_accepted_for_vos_and_ces(name: str) -> None:
    VirtualOrganisation(name=name).full_clean()
    ComputeElement(name=name).full_clean()


@pytest.mark.django_db
def test_names__unique_per_model() -> None:
    VirtualOrganisation.objects.create(name="lhcb")
    ComputeElement.objects.create(name="ce-a")

    with pytest.raises(ValidationError) as vo_error:
        VirtualOrganisation(name="lhcb").full_clean()
    with pytest.raises(ValidationError) as ce_error:
        ComputeElement(name="ce-a").full_clean()

    assert set(vo_error.value.message_dict) == {"name"}
    assert set(ce_error.value.message_dict) == {"name"}


@pytest.mark.django_db
def test_ce_full_clean__refuses_an_unknown_backend_and_status() -> None:
    with pytest.raises(ValidationError) as caught:
        ComputeElement(name="ce-a", backend="slurm", status="GONE").full_clean()

    assert set(caught.value.message_dict) == {"backend", "status"}


def test_defaults__new_ce_and_pilot() -> None:
    ce = ComputeElement(name="ce-a")
    pilot = PilotSubmission()

    assert (ce.status, ce.backend, ce.capacity, ce.backend_settings) == (
        C.ACTIVE,
        "simulated",
        1,
        {},
    )
    assert (pilot.status, pilot.external_id, pilot.started_at, pilot.finished_at) == (
        P.SUBMITTED,
        "",
        None,
        None,
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("backend", "settings", "valid"),
    [
        ("simulated", {}, True),
        ("simulated", {"seed": "x", "start_after_seconds": 0, "run_seconds": 2.5}, True),
        ("simulated", {"start_after_seconds": "5"}, False),
        ("simulated", {"run_seconds": -0.5}, False),
        ("simulated", [], False),
        ("simulated", {"bogus": 1}, False),
        ("simulated", {"command": "sleep"}, False),
        ("local", {}, True),  # the server's default command, `sleep`
        ("local", {"command": "sleep"}, True),
        ("local", {"command": "python3 -c 'pass'"}, False),  # a command line, not a name
        ("local", {"command": ["python3"]}, False),
        ("local", {"command": ""}, False),
        ("local", {"command": "sleep", "argv": ["id"]}, False),
    ],
)
def test_ce_full_clean__backend_settings_checked_for_the_backend(
    backend: str, settings: object, valid: bool
) -> None:
    ce = ComputeElement(name="ce-a", backend=backend, backend_settings=settings)

    if valid:
        ce.full_clean()
    else:
        with pytest.raises(ValidationError) as caught:
            ce.full_clean()
        assert set(caught.value.message_dict) == {"backend_settings"}


# --- the state machines on the models ---------------------------------------------------------


@pytest.mark.django_db
def test_ce_methods__drain_ban_activate_with_events() -> None:
    ce = make_ce("ce-a", capacity=2)
    submitted = make_pilot(ce)

    drained = ce.drain(actor="op")
    banned = drained.ban(actor="op")
    active = banned.activate(actor="op")

    assert (drained.status, banned.status, active.status) == ("DRAINING", "BANNED", "ACTIVE")
    steps = list(ce.events.values_list("from_status", "to_status"))
    assert steps == [("ACTIVE", "DRAINING"), ("DRAINING", "BANNED"), ("BANNED", "ACTIVE")]
    assert set(ce.events.values_list("actor", flat=True)) == {"op"}
    failed = fresh(submitted)
    assert failed.status == PilotStatus.FAILED  # banning fails what never started
    assert list(failed.events.values_list("from_status", "to_status")) == [("SUBMITTED", "FAILED")]
    assert active.activate().events.count() == 3  # already ACTIVE: no change, no event


@pytest.mark.django_db
def test_pilot_methods__mark_running_done_failed_with_events() -> None:
    ce = make_ce("ce-a", capacity=3)
    one, two = make_pilot(ce), make_pilot(ce)

    done = one.mark_running(actor="check").mark_done(actor="check")
    failed = two.mark_failed("lost", actor="check")

    assert (done.status, failed.status, failed.failure_reason) == ("DONE", "FAILED", "lost")
    assert list(one.events.values_list("to_status", flat=True)) == ["RUNNING", "DONE"]
    assert list(two.events.values_list("to_status", "note")) == [("FAILED", "lost")]
    with pytest.raises(TransitionRefused):
        done.mark_running()  # DONE is final
