"""The pilots admin: changelists render (with the CE's active and free slots), and the CE
actions go through the services."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client

from pilots import services
from pilots.models import CEStatus, ComputeElement, PilotStatus, PilotSubmission
from tests.pilots.helpers import T0, active_on, make_ce, make_pilot, make_vo

C, P = CEStatus, PilotStatus
CE_LIST = "/admin/pilots/computeelement/"
pytestmark = pytest.mark.django_db


def _messages(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _act(client: Client, action: str, *ces: ComputeElement) -> Any:
    return client.post(
        CE_LIST, {"action": action, "_selected_action": [ce.id for ce in ces]}, follow=True
    )


def test_admin_ce_changelist__shows_active_and_free_slots(admin_client: Client) -> None:
    ce = make_ce("ce-a", capacity=4, vos=["lhcb", "atlas"])
    make_pilot(ce, "lhcb", status=P.SUBMITTED)
    make_pilot(ce, "atlas", status=P.RUNNING)
    make_pilot(ce, "atlas", status=P.DONE)
    full = make_ce("ce-b", capacity=1)
    make_pilot(full, status=P.RUNNING)
    make_pilot(full, status=P.RUNNING)

    response = admin_client.get(CE_LIST)

    assert response.status_code == 200
    rows = {ce.name: ce for ce in response.context["cl"].result_list}
    page = response.content.decode()
    assert (rows["ce-a"].active_count, rows["ce-b"].active_count) == (2, 2)
    assert '<td class="field-active">2</td><td class="field-free">2</td>' in page
    assert '<td class="field-active">2</td><td class="field-free">0</td>' in page
    assert "atlas, lhcb" in page
    for url in [f"{CE_LIST}?o=4", f"{CE_LIST}?status__exact=ACTIVE", f"{CE_LIST}?q=ce-a"]:
        assert admin_client.get(url).status_code == 200, url


def test_admin_ce_change_and_add_pages_render(admin_client: Client) -> None:
    ce = make_ce("ce-a")

    assert admin_client.get(f"{CE_LIST}{ce.id}/change/").status_code == 200
    assert admin_client.get(f"{CE_LIST}add/").status_code == 200
    assert admin_client.get("/admin/pilots/virtualorganisation/").status_code == 200


def test_admin_ce_add__refuses_backend_settings_the_backend_cannot_use(
    admin_client: Client,
) -> None:
    form = {
        "name": "ce-new",
        "capacity": "2",
        "reliability": "0.5",
        "backend": "simulated",
        "backend_settings": '{"run_seconds": "long"}',
    }

    refused = admin_client.post(f"{CE_LIST}add/", form)
    form["backend_settings"] = '{"run_seconds": 30}'
    accepted = admin_client.post(f"{CE_LIST}add/", form)

    assert refused.status_code == 200
    assert "run_seconds: must be a number" in refused.content.decode()
    assert accepted.status_code == 302
    assert ComputeElement.objects.get().backend_settings == {"run_seconds": 30}


@pytest.mark.parametrize("command", ["id", '["id"]'])
def test_admin_ce_add__refuses_a_command_line_in_backend_settings(
    admin_client: Client, command: str
) -> None:
    value = command if command.startswith("[") else f'"{command}"'
    form = {
        "name": "ce-new",
        "capacity": "2",
        "reliability": "0.5",
        "backend": "local",
        "backend_settings": f'{{"command": {value}}}',
    }

    refused = admin_client.post(f"{CE_LIST}add/", form)
    form["backend_settings"] = '{"command": "sleep"}'
    accepted = admin_client.post(f"{CE_LIST}add/", form)

    assert refused.status_code == 200
    assert "PILOT_LOCAL_COMMANDS" in refused.content.decode()
    assert accepted.status_code == 302
    assert ComputeElement.objects.get().backend_settings == {"command": "sleep"}


def test_admin_ce_actions__drain_ban_activate(admin_client: Client) -> None:
    a = make_ce("ce-a", capacity=3)
    b = make_ce("ce-b", capacity=3)
    submitted = make_pilot(a, status=P.SUBMITTED)

    drained = _act(admin_client, "drain", a, b)
    assert "Drained 2." in _messages(drained)
    assert set(ComputeElement.objects.values_list("status", flat=True)) == {C.DRAINING}

    banned = _act(admin_client, "ban", a)
    assert "Banned 1." in _messages(banned)
    failed = PilotSubmission.objects.get(id=submitted.id)
    assert (failed.status, failed.failure_reason) == (P.FAILED, "CE ce-a banned by admin")

    activated = _act(admin_client, "activate", a, b)
    assert "Activated 2." in _messages(activated)
    assert set(ComputeElement.objects.values_list("status", flat=True)) == {C.ACTIVE}


def test_admin_ce_actions__submit_one(admin_client: Client) -> None:
    make_vo("atlas", enabled=False)
    free = make_ce("ce-free", capacity=2, vos=["lhcb", "atlas"])
    full = make_ce("ce-full", capacity=1)
    make_pilot(full, status=P.RUNNING)
    no_vo = make_ce("ce-no-vo", capacity=1, vos=["atlas"])

    response = _act(admin_client, "submit_one", free, full, no_vo)

    messages = _messages(response)
    assert "Submitted a pilot to 1." in messages
    assert any("ce-full is full" in m for m in messages), messages
    assert any("ce-no-vo does not serve an enabled VO" in m for m in messages), messages
    pilot = PilotSubmission.objects.get(ce=free)
    assert (pilot.vo.name, pilot.status) == ("lhcb", P.SUBMITTED)
    assert (active_on("ce-full"), active_on("ce-no-vo")) == (1, 0)


def test_admin_pilot_and_report_changelists_render(admin_client: Client) -> None:
    ce = make_ce("ce-a", capacity=3)
    pilot = make_pilot(ce, status=P.FAILED, failure_reason="visible reason")
    services.pilot_report_create()

    for url, needle in [
        ("/admin/pilots/pilotsubmission/", str(pilot.id)),
        ("/admin/pilots/pilotsubmission/?status__exact=FAILED", "visible reason"),
        (f"/admin/pilots/pilotsubmission/?q={pilot.id}", "visible reason"),
        ("/admin/pilots/pilotsubmission/?q=visible", "visible reason"),
        ("/admin/pilots/pilotsubmission/?q=not-a-uuid", "0 pilot submissions"),
        (f"/admin/pilots/pilotsubmission/{pilot.id}/change/", "visible reason"),
        ("/admin/pilots/pilotreport/", "FAILED"),
    ]:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert needle in response.content.decode(), url


def test_admin_pilot_changelist__newest_first_to_the_second(admin_client: Client) -> None:
    ce = make_ce("ce-a", capacity=3)
    older = make_pilot(ce, submitted_at=T0 + timedelta(seconds=3))
    newer = make_pilot(ce, submitted_at=T0 + timedelta(seconds=7))

    response = admin_client.get("/admin/pilots/pilotsubmission/")

    assert [p.id for p in response.context["cl"].result_list] == [newer.id, older.id]
    page = response.content.decode()
    assert f'<td class="field-submitted">{T0 + timedelta(seconds=7):%Y-%m-%d %H:%M:%S}</td>' in page
    assert '<td class="field-finished">-</td>' in page


def test_admin_pilots_cannot_be_added_or_edited(admin_client: Client) -> None:
    pilot = make_pilot(make_ce("ce-a"), status=P.RUNNING)

    assert admin_client.get("/admin/pilots/pilotsubmission/add/").status_code == 403
    assert admin_client.get("/admin/pilots/pilotreport/add/").status_code == 403
    admin_client.post(f"/admin/pilots/pilotsubmission/{pilot.id}/change/", {"status": "DONE"})
    assert PilotSubmission.objects.get(id=pilot.id).status == P.RUNNING
