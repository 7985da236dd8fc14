"""The REST API of VOs, Compute Elements and pilots through DRF's APIClient: bodies, status
codes, field errors, filters and permissions. No request may answer 5xx (autouse check)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from pilots import queues
from pilots.models import ComputeElement, PilotStatus, PilotSubmission, VirtualOrganisation
from tasks.models import Scheduler
from tests.pilots.helpers import T0, make_ce, make_pilot, make_vo
from tests.tasks.helpers import forbid_server_errors

P = PilotStatus
CES = "/api/compute-elements/"
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


def _post(client: APIClient, url: str, body: Any = None) -> Any:
    return client.post(url, body, format="json")


def _patch(client: APIClient, url: str, body: Any) -> Any:
    return client.patch(url, body, format="json")


# --- VOs -------------------------------------------------------------------------------------


def test_vos__create_list_retrieve_patch(operator_client: APIClient) -> None:
    created = _post(operator_client, "/api/vos/", {"name": "lhcb"})
    _post(operator_client, "/api/vos/", {"name": "atlas", "enabled": False})

    assert created.status_code == 201
    assert created.json()["name"] == "lhcb" and created.json()["enabled"] is True
    listed = operator_client.get("/api/vos/").json()
    assert listed["count"] == 2
    assert [(v["name"], v["enabled"]) for v in listed["results"]] == [
        ("atlas", False),
        ("lhcb", True),
    ]
    assert operator_client.get("/api/vos/lhcb/").json()["enabled"] is True
    patched = _patch(operator_client, "/api/vos/lhcb/", {"enabled": False})
    assert (patched.status_code, patched.json()["enabled"]) == (200, False)
    assert VirtualOrganisation.objects.get(name="lhcb").enabled is False


@pytest.mark.parametrize("name", ["", "-x", "has space", "x" * 101, "a/b"])
def test_vos__bad_name_is_400_naming_the_field(operator_client: APIClient, name: str) -> None:
    response = _post(operator_client, "/api/vos/", {"name": name})

    assert response.status_code == 400
    assert set(response.json()) == {"name"}
    assert not VirtualOrganisation.objects.exists()


def test_vos__duplicate_name_400_unknown_404_no_delete(operator_client: APIClient) -> None:
    make_vo("lhcb")

    assert set(_post(operator_client, "/api/vos/", {"name": "lhcb"}).json()) == {"name"}
    assert operator_client.get("/api/vos/nobody/").status_code == 404
    assert operator_client.delete("/api/vos/lhcb/").status_code == 405
    assert operator_client.put("/api/vos/lhcb/", {"name": "x"}, format="json").status_code == 405
    assert VirtualOrganisation.objects.count() == 1


# --- compute elements ------------------------------------------------------------------------

CE_BODY = {
    "name": "ce-cern.ch",
    "capacity": 3,
    "reliability": 0.5,
    "vos": ["lhcb", "atlas"],
    "backend": "simulated",
    "backend_settings": {"seed": "s", "run_seconds": 10},
}


def test_ces__create_with_vos_by_name(operator_client: APIClient) -> None:
    make_vo("lhcb")
    make_vo("atlas")

    response = _post(operator_client, CES, CE_BODY)

    assert response.status_code == 201
    body = response.json()
    assert {k: body[k] for k in CE_BODY if k != "vos"} == {
        k: v for k, v in CE_BODY.items() if k != "vos"
    }
    assert sorted(body["vos"]) == ["atlas", "lhcb"]
    assert (body["status"], body["active_pilots"], body["free_slots"]) == ("ACTIVE", 0, 3)
    ce = ComputeElement.objects.get(name="ce-cern.ch")
    assert sorted(ce.vos.values_list("name", flat=True)) == ["atlas", "lhcb"]


def test_ces__defaults(operator_client: APIClient) -> None:
    body = _post(operator_client, CES, {"name": "ce-min"}).json()

    assert (body["capacity"], body["reliability"], body["vos"], body["backend"]) == (
        1,
        0.9,
        [],
        "simulated",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("capacity", -1),
        ("capacity", "many"),
        ("capacity", 2**63),
        ("reliability", 1.5),
        ("reliability", -0.1),
        ("reliability", "NaN"),
        ("vos", ["nobody"]),
        ("vos", "lhcb"),
        ("backend", "slurm"),
        ("backend_settings", [1, 2]),
        ("backend_settings", "text"),
        ("backend_settings", 3),
        ("backend_settings", {"command": "a\u0000b"}),
        ("name", "bad name"),
        ("name", ""),
    ],
)
def test_ces__bad_field_is_400_naming_it(
    operator_client: APIClient, field: str, value: Any
) -> None:
    make_vo("lhcb")

    response = _post(operator_client, CES, {"name": "ce-a", "vos": ["lhcb"], field: value})

    assert response.status_code == 400, response.json()
    assert set(response.json()) == {field}
    assert not ComputeElement.objects.exists()


@pytest.mark.parametrize(
    ("backend", "settings"),
    [
        ("simulated", {"start_after_seconds": "soon"}),
        ("simulated", {"run_seconds": -1}),
        ("simulated", {"run_seconds": True}),
        ("simulated", {"run_seconds": 10**400}),
        ("simulated", {"start_after_seconds": None}),
        ("simulated", {"bogus": 1}),
        ("local", {"command": 5}),
        ("local", {"command": "  "}),
        ("local", {"command": "id"}),
        ("local", {"command": ["id"]}),
        ("local", {"shell": "id"}),
    ],
)
def test_ces__backend_settings_the_backend_cannot_use_are_400(
    operator_client: APIClient, backend: str, settings: dict[str, Any]
) -> None:
    body = {"name": "ce-a", "backend": backend, "backend_settings": settings}

    response = _post(operator_client, CES, body)

    assert response.status_code == 400, response.json()
    assert set(response.json()) == {"backend_settings"}
    assert not ComputeElement.objects.exists()


def test_ces__backend_settings_checked_against_the_backend_on_patch(
    operator_client: APIClient,
) -> None:
    make_ce("ce-a", backend="local", backend_settings={"command": "true", "run_seconds": "x"})

    to_simulated = _patch(operator_client, f"{CES}ce-a/", {"backend": "simulated"})
    bad_settings = _patch(operator_client, f"{CES}ce-a/", {"backend_settings": {"command": ""}})
    fixed = _patch(
        operator_client, f"{CES}ce-a/", {"backend": "simulated", "backend_settings": {"seed": 1}}
    )

    assert (to_simulated.status_code, set(to_simulated.json())) == (400, {"backend_settings"})
    assert (bad_settings.status_code, set(bad_settings.json())) == (400, {"backend_settings"})
    assert fixed.status_code == 200
    assert ComputeElement.objects.get().backend_settings == {"seed": 1}


def test_ces__duplicate_name_and_non_object_body_are_400(operator_client: APIClient) -> None:
    make_ce("ce-a")

    assert set(_post(operator_client, CES, {"name": "ce-a"}).json()) == {"name"}
    assert _post(operator_client, CES, [1, 2]).status_code == 400
    assert ComputeElement.objects.count() == 1


def test_ces__patch_fields_but_not_name_or_status(operator_client: APIClient) -> None:
    make_ce("ce-a", capacity=2, vos=["lhcb"])
    make_vo("atlas")
    body = {"capacity": 7, "vos": ["atlas"], "name": "ce-renamed", "status": "BANNED"}

    # The name and status are refused, not dropped: a 200 let the client believe them set.
    refused = _patch(operator_client, f"{CES}ce-a/", body)
    response = _patch(operator_client, f"{CES}ce-a/", {"capacity": 7, "vos": ["atlas"]})

    assert refused.status_code == 400 and set(refused.json()) == {"name", "status"}
    assert response.status_code == 200
    ce = ComputeElement.objects.get()
    assert (ce.name, ce.status, ce.capacity) == ("ce-a", "ACTIVE", 7)
    assert list(ce.vos.values_list("name", flat=True)) == ["atlas"]
    assert set(_patch(operator_client, f"{CES}ce-a/", {"reliability": 2}).json()) == {"reliability"}


def test_ces__patch_moves_modified_at(
    operator_client: APIClient, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    make_ce("ce-a", capacity=2)
    time_machine.move_to(T0 + timedelta(minutes=5), tick=False)

    body = _patch(operator_client, f"{CES}ce-a/", {"capacity": 3}).json()

    later = T0 + timedelta(minutes=5)
    assert ComputeElement.objects.get().modified_at == later
    assert body["modified_at"] == later.isoformat().replace("+00:00", "Z")
    assert ComputeElement.objects.get().created_at == T0


def test_ces__active_pilots_and_free_slots(operator_client: APIClient) -> None:
    ce = make_ce("ce-a", capacity=3, vos=["lhcb", "atlas"])
    other = make_ce("ce-b", capacity=1)
    make_pilot(ce, "lhcb", status=P.SUBMITTED)
    make_pilot(ce, "atlas", status=P.RUNNING)
    make_pilot(ce, "atlas", status=P.DONE)
    make_pilot(ce, "lhcb", status=P.FAILED)
    make_pilot(other, status=P.RUNNING)
    make_pilot(other, status=P.RUNNING)  # over capacity (capacity lowered meanwhile)

    listed = {c["name"]: c for c in operator_client.get(CES).json()["results"]}
    one = operator_client.get(f"{CES}ce-a/").json()

    assert (listed["ce-a"]["active_pilots"], listed["ce-a"]["free_slots"]) == (2, 1)
    assert (listed["ce-b"]["active_pilots"], listed["ce-b"]["free_slots"]) == (2, 0)
    assert (one["active_pilots"], one["free_slots"]) == (2, 1)


def test_ces__drain_ban_activate(operator_client: APIClient) -> None:
    ce = make_ce("ce-a", capacity=3)
    submitted = make_pilot(ce, status=P.SUBMITTED)
    running = make_pilot(ce, status=P.RUNNING)

    for action, status in [("drain", "DRAINING"), ("ban", "BANNED"), ("activate", "ACTIVE")]:
        response = _post(operator_client, f"{CES}ce-a/{action}/")
        assert (response.status_code, response.json()["status"]) == (200, status)
    again = _post(operator_client, f"{CES}ce-a/activate/")

    assert (again.status_code, again.json()["status"]) == (200, "ACTIVE")
    failed = PilotSubmission.objects.get(id=submitted.id)
    assert (failed.status, failed.failure_reason) == (P.FAILED, "CE ce-a banned by op")
    assert PilotSubmission.objects.get(id=running.id).status == P.RUNNING
    assert _post(operator_client, f"{CES}ce-nope/drain/").status_code == 404


def test_ces__submit(operator_client: APIClient) -> None:
    make_ce("ce-a", capacity=1, vos=["lhcb", "atlas"])

    created = _post(operator_client, f"{CES}ce-a/submit/", {"vo": "lhcb"})
    full = _post(operator_client, f"{CES}ce-a/submit/", {"vo": "atlas"})

    assert created.status_code == 201
    pilot = created.json()
    assert (pilot["ce"], pilot["vo"], pilot["status"]) == ("ce-a", "lhcb", "SUBMITTED")
    assert pilot["external_id"].startswith("sim-")
    assert PilotSubmission.objects.get().id.hex == pilot["id"].replace("-", "")
    assert full.status_code == 409
    assert "full" in full.json()["detail"]
    assert operator_client.get(f"{CES}ce-a/").json()["free_slots"] == 0


@pytest.mark.parametrize(
    ("ce", "body", "status", "keys"),
    [
        ("ce-nope", {"vo": "lhcb"}, 404, {"detail"}),
        ("ce-a", {}, 400, {"vo"}),
        ("ce-a", {"vo": ""}, 400, {"vo"}),
        ("ce-a", {"vo": ["lhcb"]}, 400, {"vo"}),
        ("ce-a", {"vo": "x" * 101}, 400, {"vo"}),
        ("ce-a", {"vo": "a\u0000b"}, 400, {"vo"}),
        ("ce-a", {"vo": "nobody"}, 409, {"detail"}),
        ("ce-drained", {"vo": "lhcb"}, 409, {"detail"}),
    ],
)
def test_ces__submit_refused(
    operator_client: APIClient, ce: str, body: Any, status: int, keys: set[str]
) -> None:
    make_ce("ce-a", capacity=1)
    make_ce("ce-drained", capacity=1, status="DRAINING")

    response = _post(operator_client, f"{CES}{ce}/submit/", body)

    assert response.status_code == status
    assert set(response.json()) == keys
    assert not PilotSubmission.objects.exists()


def test_ces__delete_refused_with_pilots_allowed_without(operator_client: APIClient) -> None:
    used = make_ce("ce-used")
    make_pilot(used, status=P.DONE)
    make_ce("ce-new")

    refused = operator_client.delete(f"{CES}ce-used/")
    deleted = operator_client.delete(f"{CES}ce-new/")

    assert refused.status_code == 409
    assert "has pilots on record" in refused.json()["detail"]
    assert deleted.status_code == 204
    assert list(ComputeElement.objects.values_list("name", flat=True)) == ["ce-used"]
    assert operator_client.delete(f"{CES}ce-new/").status_code == 404


# --- pilots ----------------------------------------------------------------------------------


def _arrange_pilots() -> dict[str, PilotSubmission]:
    a = make_ce("ce-a", capacity=9, vos=["lhcb", "atlas"])
    b = make_ce("ce-b", capacity=9, vos=["lhcb"])
    return {
        "a-lhcb-sub": make_pilot(a, "lhcb", status=P.SUBMITTED, submitted_at=T0),
        "a-atlas-run": make_pilot(
            a, "atlas", status=P.RUNNING, submitted_at=T0 + timedelta(hours=1)
        ),
        "b-lhcb-done": make_pilot(b, "lhcb", status=P.DONE, submitted_at=T0 + timedelta(hours=2)),
        "b-lhcb-fail": make_pilot(b, "lhcb", status=P.FAILED, submitted_at=T0 + timedelta(hours=3)),
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["b-lhcb-fail", "b-lhcb-done", "a-atlas-run", "a-lhcb-sub"]),
        ("?ce=ce-a", ["a-atlas-run", "a-lhcb-sub"]),
        ("?vo=lhcb", ["b-lhcb-fail", "b-lhcb-done", "a-lhcb-sub"]),
        ("?status=RUNNING", ["a-atlas-run"]),
        ("?status=DONE&status=FAILED", ["b-lhcb-fail", "b-lhcb-done"]),
        ("?ce=ce-b&status=DONE", ["b-lhcb-done"]),
        ("?submitted_after=2030-01-01T11:05:00Z", ["b-lhcb-fail", "b-lhcb-done", "a-atlas-run"]),
        ("?submitted_before=2030-01-01T11:05:00Z", ["a-lhcb-sub"]),
        (
            "?submitted_after=2030-01-01T11:00:00Z&submitted_before=2030-01-01T12:05:01Z",
            ["b-lhcb-done", "a-atlas-run"],
        ),
        ("?ce=nowhere", []),
    ],
)
def test_pilots__list_filters(operator_client: APIClient, query: str, expected: list[str]) -> None:
    pilots = _arrange_pilots()
    names = {str(p.id): name for name, p in pilots.items()}

    response = operator_client.get(f"/api/pilots/{query}")

    assert response.status_code == 200
    assert [names[p["id"]] for p in response.json()["results"]] == expected


@pytest.mark.parametrize(
    "query",
    ["?status=LOST", "?submitted_after=yesterday", "?submitted_before=2030-13-01", "?ce=%00"],
)
def test_pilots__bad_filter_is_400(operator_client: APIClient, query: str) -> None:
    _arrange_pilots()

    assert operator_client.get(f"/api/pilots/{query}").status_code == 400


def test_pilots__retrieve(operator_client: APIClient) -> None:
    pilot = _arrange_pilots()["a-atlas-run"]

    body = operator_client.get(f"/api/pilots/{pilot.id}/").json()

    assert {k: body[k] for k in ("id", "ce", "vo", "status")} == {
        "id": str(pilot.id),
        "ce": "ce-a",
        "vo": "atlas",
        "status": "RUNNING",
    }
    assert operator_client.get(f"/api/pilots/{pilot.id.hex.upper()}/").status_code == 200
    missing = "7d1e2a9c-0000-4000-8000-000000000000"
    assert operator_client.get(f"/api/pilots/{missing}/").status_code == 404
    assert operator_client.get("/api/pilots/not-a-uuid/").status_code == 404


def test_pilots__summary(operator_client: APIClient) -> None:
    _arrange_pilots()

    response = operator_client.get("/api/pilots/summary/")

    assert response.status_code == 200
    assert response.json() == {
        "by_status": {"SUBMITTED": 1, "RUNNING": 1, "DONE": 1, "FAILED": 1},
        "by_ce": {"ce-a": {"SUBMITTED": 1, "RUNNING": 1}, "ce-b": {"DONE": 1, "FAILED": 1}},
        "by_vo": {"lhcb": {"SUBMITTED": 1, "DONE": 1, "FAILED": 1}, "atlas": {"RUNNING": 1}},
    }


def test_pilots__read_only(operator_client: APIClient) -> None:
    pilot = _arrange_pilots()["a-lhcb-sub"]

    assert _post(operator_client, "/api/pilots/", {}).status_code == 405
    assert (
        _patch(operator_client, f"/api/pilots/{pilot.id}/", {"status": "DONE"}).status_code == 405
    )
    assert operator_client.delete(f"/api/pilots/{pilot.id}/").status_code == 405
    assert PilotSubmission.objects.get(id=pilot.id).status == P.SUBMITTED


# --- permissions -----------------------------------------------------------------------------

READS = ["/api/vos/", "/api/vos/lhcb/", CES, f"{CES}ce-a/", "/api/pilots/", "/api/pilots/summary/"]
WRITES = [
    ("post", "/api/vos/", {"name": "cms"}),
    ("patch", "/api/vos/lhcb/", {"enabled": True}),
    ("post", CES, {"name": "ce-new"}),
    ("patch", f"{CES}ce-a/", {"capacity": 9}),
    ("delete", f"{CES}ce-a/", None),
    ("post", f"{CES}ce-a/drain/", None),
    ("post", f"{CES}ce-a/ban/", None),
    ("post", f"{CES}ce-a/activate/", None),
    ("post", f"{CES}ce-a/submit/", {"vo": "lhcb"}),
]


def _call(client: APIClient, method: str, url: str, body: Any = None) -> Any:
    if method in {"get", "delete"}:
        return getattr(client, method)(url)
    return getattr(client, method)(url, body, format="json")


def _state() -> tuple[Any, ...]:
    return (
        list(VirtualOrganisation.objects.order_by("id").values()),
        list(ComputeElement.objects.order_by("id").values()),
        PilotSubmission.objects.count(),
    )


def test_permissions__anonymous_is_401_everywhere(anon_client: APIClient) -> None:
    make_ce("ce-a")
    before = _state()

    for url in READS:
        assert anon_client.get(url).status_code == 401, url
    for method, url, body in WRITES:
        assert _call(anon_client, method, url, body).status_code == 401, url
    assert _state() == before


def test_permissions__runner_is_403_on_writes(runner_client: APIClient) -> None:
    make_ce("ce-a")
    before = _state()

    for method, url, body in WRITES:
        assert _call(runner_client, method, url, body).status_code == 403, url
    assert _state() == before


def test_permissions__operator_reads_and_writes(operator_client: APIClient) -> None:
    make_ce("ce-a")

    for url in READS:
        assert operator_client.get(url).status_code == 200, url
    expected = [201, 200, 201, 200, 204]
    for (method, url, body), status in zip(WRITES[:5], expected, strict=True):
        assert _call(operator_client, method, url, body).status_code == status, url
    make_ce("ce-a")
    for method, url, body in WRITES[5:]:
        assert _call(operator_client, method, url, body).status_code in {200, 201}, url


# --- no code execution through the API (DESIGN §9.2) ------------------------------------------


def _touch(marker: Any) -> list[str]:
    return ["touch", str(marker)]


@pytest.mark.parametrize(
    "command",
    [
        "touch {marker}",  # a shell string
        "sh -c 'touch {marker}'",
        ["touch", "{marker}"],  # an argv
        {"argv": ["touch", "{marker}"]},
    ],
)
def test_ces__a_command_in_backend_settings_is_400_and_nothing_runs(
    operator_client: APIClient, settings: Any, var_dir: Any, tmp_path: Any, command: Any
) -> None:
    marker = tmp_path / "ran"
    settings.PILOT_LOCAL_COMMANDS = {"sleep": ["true"]}  # the server's default, made quick
    command = _fill(command, str(marker))
    body = {"name": "ce-a", "vos": ["lhcb"], "backend": "local"}
    make_vo("lhcb")
    make_ce("ce-b", backend="local")

    created = _post(operator_client, CES, {**body, "backend_settings": {"command": command}})
    patched = _patch(operator_client, f"{CES}ce-b/", {"backend_settings": {"command": command}})
    submitted = _post(operator_client, f"{CES}ce-b/submit/", {"vo": "lhcb"})

    assert (created.status_code, set(created.json())) == (400, {"backend_settings"})
    assert "PILOT_LOCAL_COMMANDS" in str(created.json()["backend_settings"])
    assert (patched.status_code, set(patched.json())) == (400, {"backend_settings"})
    assert list(ComputeElement.objects.values_list("name", "backend_settings")) == [("ce-b", {})]
    assert submitted.status_code == 201  # ce-b runs the server's default command, not the body's
    _wait_for_pilot_exit(var_dir, submitted.json()["id"])
    assert not marker.exists()


def test_ces__backend_settings_name_one_of_the_servers_local_commands(
    operator_client: APIClient, settings: Any, var_dir: Any, tmp_path: Any
) -> None:
    marker = tmp_path / "ran"
    settings.PILOT_LOCAL_COMMANDS = {"touch-marker": _touch(marker)}
    make_vo("lhcb")
    body = {"name": "ce-a", "vos": ["lhcb"], "backend": "local"}

    unknown = _post(operator_client, CES, {**body, "backend_settings": {"command": "sleep"}})
    created = _post(operator_client, CES, {**body, "backend_settings": {"command": "touch-marker"}})
    submitted = _post(operator_client, f"{CES}ce-a/submit/", {"vo": "lhcb"})

    assert (unknown.status_code, set(unknown.json())) == (400, {"backend_settings"})
    assert "touch-marker" in str(unknown.json()["backend_settings"])
    assert created.status_code == 201, created.json()
    assert submitted.status_code == 201
    _wait_for_pilot_exit(var_dir, submitted.json()["id"])
    assert marker.exists()


def _fill(command: Any, marker: str) -> Any:
    if isinstance(command, str):
        return command.format(marker=marker)
    if isinstance(command, list):
        return [_fill(part, marker) for part in command]
    return {key: _fill(value, marker) for key, value in command.items()}


def _wait_for_pilot_exit(var_dir: Any, pilot_id: str) -> None:
    """A local pilot's shell writes its exit file when its command has ended."""
    exit_file = var_dir / "pilots" / f"{uuid.UUID(pilot_id).hex}.exit"
    deadline = time.monotonic() + 20
    while not exit_file.exists():
        assert time.monotonic() < deadline, "the pilot process did not end in 20 s"
        time.sleep(0.05)


# --- the system queues (DESIGN §9.2) ----------------------------------------------------------


@pytest.mark.parametrize("queue_id", [queue for queue, _ in queues.QUEUES])
def test_system_queues__delete_is_409_naming_the_rule(
    operator_client: APIClient, queue_id: str
) -> None:
    response = operator_client.delete(f"/api/schedulers/{queue_id}/")

    assert response.status_code == 409, response.content
    assert "system queues cannot be deleted" in response.json()["detail"]
    assert Scheduler.objects.filter(id=queue_id, system=True).exists()


def test_system_queues__other_queues_are_still_deleted(operator_client: APIClient) -> None:
    body = {"id": "mine", "kind": "celery", "handler": "pilots.submit_pilot"}
    created = _post(operator_client, "/api/schedulers/", body)

    deleted = operator_client.delete("/api/schedulers/mine/")

    assert (created.status_code, deleted.status_code) == (201, 204)
    assert not Scheduler.objects.filter(id="mine").exists()
