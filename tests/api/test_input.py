"""Bad input is a 400 (or 404, 415) naming the problem, on every endpoint alike: what
schemathesis found, pinned down (scheduler_site/api_input.py, scheduler_site/schema.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from rest_framework.test import APIClient

from scheduler_site.schema import NOT_ONLY_WHITESPACE
from tasks import services
from tests.api.conftest import snapshot
from tests.tasks.helpers import forbid_server_errors


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "parameter"),
    [
        ("/api/tasks/?hash=", "hash"),  # django-filter would ignore it and list everything
        ("/api/tasks/?created_after=", "created_after"),
        ("/api/tasks/?priority=0.5", "priority"),
        ("/api/tasks/?priority=99999999999999999999", "priority"),
        ("/api/tasks/?page_size=ten", "page_size"),
        ("/api/tasks/?page_size=0", "page_size"),
        ("/api/tasks/?page_size=1001", "page_size"),
        ("/api/tasks/stats/?scheduler=", "scheduler"),
        ("/api/tasks/stats/?hours=", "hours"),
        ("/api/schedules/?due_before=", "due_before"),
        ("/api/schedulers/?limit=ten", "limit"),  # DRF would fall back to its default
        ("/api/schedulers/?limit=0", "limit"),
        ("/api/schedulers/?limit=1001", "limit"),
        ("/api/vos/?offset=-1", "offset"),
        ("/api/pilots/?offset=null", "offset"),
        ("/api/pilots/?vo=", "vo"),
    ],
)
def test_query__a_bad_or_empty_parameter_is_400_naming_it(
    operator_client: APIClient, world: dict[str, str], url: str, parameter: str
) -> None:
    response = operator_client.get(url)
    assert response.status_code == 400, response.content[:300]
    assert list(response.json()) == [parameter]


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/tasks/", "/api/schedules/"])
@pytest.mark.parametrize("position", ["p=garbage", "o=-1", "p=2030-13-45"])
def test_query__a_forged_cursor_is_invalid_not_an_error(
    operator_client: APIClient, world: dict[str, str], url: str, position: str
) -> None:
    cursor = base64.b64encode(position.encode()).decode()
    response = operator_client.get(url, {"cursor": cursor})
    assert response.status_code == 404
    assert response.json() == {"detail": "Invalid cursor"}


@pytest.mark.django_db
def test_query__a_time_with_a_large_offset_is_compared_in_utc(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    """ISO 8601 allows offsets PostgreSQL refuses (beyond ±15:59): 2030 minus 17:24 is
    still 2030 in UTC, so everything is created before it."""
    response = operator_client.get("/api/tasks/", {"created_before": "2030-01-01T00:00:00-17:24"})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 3
    pilots = operator_client.get("/api/pilots/", {"submitted_after": "2004-04-22T11:52:23-17:24"})
    assert pilots.status_code == 200 and len(pilots.json()["results"]) == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        # DRF alone would coerce each of these.
        ("post", "/api/schedulers/", {"id": "x", "dead_letter": 0}, "dead_letter"),
        ("post", "/api/schedulers/", {"id": "x", "max_attempts": "3"}, "max_attempts"),
        ("post", "/api/schedulers/", {"id": 7}, "id"),
        ("post", "/api/schedulers/boefje/push/", {"priority": 1.0}, "priority"),
        ("post", "/api/schedulers/boefje/push/", {"data": []}, "data"),
        ("post", "/api/schedulers/boefje/push/", {"data": None}, "data"),
        ("post", "/api/schedulers/boefje/pop/", {"limit": "5"}, "limit"),
        ("patch", "/api/tasks/{dispatched}/", {"status": "RUNNING", "attempt": True}, "attempt"),
        ("patch", "/api/tasks/{dispatched}/", {"result": {}}, "status"),  # a report needs one
        ("post", "/api/vos/", {"name": "atlas", "enabled": "yes"}, "enabled"),
        ("post", "/api/vos/", {"name": 123}, "name"),  # a number is not a name
        ("patch", "/api/vos/lhcb/", {"name": 1.5}, "name"),
        ("post", "/api/compute-elements/", {"name": 5}, "name"),
        ("post", "/api/compute-elements/ce-a/submit/", {"vo": 5}, "vo"),
        ("post", "/api/schedules/", {"scheduler": "boefje", "cron": 5}, "cron"),
        ("post", "/api/schedulers/boefje/push/", {"hash": 5}, "hash"),
        ("post", "/api/tasks/{dispatched}/release/", {"reason": 5}, "reason"),
        ("patch", "/api/tasks/{dispatched}/", {"status": "FAILED", "error": 5}, "error"),
        ("post", "/api/compute-elements/", {"name": "ce-x", "vos": {"lhcb": 1}}, "vos"),
        ("post", "/api/compute-elements/", {"name": "ce-x", "reliability": "1"}, "reliability"),
        ("post", "/api/compute-elements/ce-a/submit/", {"vo": ["lhcb"]}, "vo"),
        ("post", "/api/schedules/", {"scheduler": 1, "interval_seconds": 60}, "scheduler"),
    ],
)
def test_body__a_value_of_the_wrong_json_type_is_400_and_changes_nothing(
    operator_client: APIClient,
    world: dict[str, str],
    method: str,
    url: str,
    body: Any,
    field: str,
) -> None:
    before = snapshot()
    response = getattr(operator_client, method)(url.format(**world), body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert field in response.json()
    assert snapshot() == before


@pytest.mark.django_db
def test_body__json_only(operator_client: APIClient, world: dict[str, str]) -> None:
    before = snapshot()
    response = operator_client.post("/api/schedulers/boefje/push/", {"priority": "1"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    ["/api/tasks/not-a-uuid/", "/api/schedulers/Not_Valid!/", "/api/compute-elements/%C2%84/"],
)
def test_path__an_id_of_the_wrong_shape_is_a_json_404(
    operator_client: APIClient, world: dict[str, str], url: str
) -> None:
    response = operator_client.get(url)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


@pytest.mark.django_db
def test_path__outside_the_api_404_is_still_a_page(operator_client: APIClient) -> None:
    response = operator_client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_schema__every_operation_documents_its_errors(operator_client: APIClient) -> None:
    schema = operator_client.get("/api/schema/?format=json").json()
    error = {"$ref": "#/components/schemas/Error"}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            for code in ("401", "403", "429"):
                assert code in responses, (method, path, code)
            if "{" in path:
                assert "404" in responses, (method, path)
            if "requestBody" in operation:
                assert "400" in responses, (method, path)
                assert list(operation["requestBody"]["content"]) == ["application/json"]
            for code, response in responses.items():
                if code.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == error
    components = schema["components"]["schemas"]
    for name, component in components.items():
        if not name.endswith("Request"):
            continue
        # What a body may hold, and nothing else (StrictTypes); a body of one of several shapes
        # (push: one task or an array of them) holds one of strict shapes.
        for shape in component.get("oneOf", [component]):
            ref = shape.get("items", shape).get("$ref")
            strict = components[ref.rsplit("/", 1)[1]] if ref else shape
            assert strict["additionalProperties"] is False, name
    report = schema["components"]["schemas"]["TaskReportRequest"]
    assert report["required"] == ["status"]  # a PATCH, but a complete report
    assert "PatchedSchedulerUpdateRequest" in schema["components"]["schemas"]
    assert (
        "id" not in schema["components"]["schemas"]["PatchedSchedulerUpdateRequest"]["properties"]
    )


@pytest.mark.django_db
def test_body__a_string_trimmed_to_blank_is_refused_and_the_schema_says_so(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    # Found by schemathesis: " " (then "\x1e", whitespace to Python but not to JSON Schema's
    # ECMA regexes) met the schema but DRF trims it and refuses it blank. The schema now asks
    # for a character Python does not trim; the API still says 400.
    schema = operator_client.get("/api/schema/?format=json").json()["components"]["schemas"]
    assert schema["TaskPushRequest"]["properties"]["hash"]["pattern"] == NOT_ONLY_WHITESPACE
    assert schema["ScheduleRequest"]["properties"]["timezone"]["pattern"] == NOT_ONLY_WHITESPACE
    # A field with its own regex keeps it.
    assert schema["SchedulerRequest"]["properties"]["id"]["pattern"].startswith("^[a-z0-9]")

    before = snapshot()
    response = operator_client.post("/api/schedulers/spare/push/", {"hash": " \r "}, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["hash"]
    assert snapshot() == before


# --- unknown and read-only fields -------------------------------------------------------------

# Every endpoint that takes a body, with a body that is otherwise valid.
BODY_ENDPOINTS = [
    ("post", "/api/schedulers/", {"id": "fresh"}),
    ("patch", "/api/schedulers/spare/", {"max_queue_size": 5}),
    ("post", "/api/schedulers/boefje/push/", {"data": {}}),
    ("post", "/api/schedulers/boefje/pop/", {"limit": 1}),
    ("patch", "/api/tasks/{dispatched}/", {"status": "RUNNING"}),
    ("post", "/api/tasks/{dispatched}/heartbeat/", {}),
    ("post", "/api/tasks/{dispatched}/release/", {}),
    ("post", "/api/schedules/", {"scheduler": "boefje", "interval_seconds": 60}),
    ("patch", "/api/schedules/{schedule}/", {"priority": 3}),
    ("post", "/api/vos/", {"name": "atlas"}),
    ("patch", "/api/vos/lhcb/", {"enabled": False}),
    ("post", "/api/compute-elements/", {"name": "ce-x"}),
    ("patch", "/api/compute-elements/ce-b/", {"capacity": 2}),
    ("post", "/api/compute-elements/ce-a/submit/", {"vo": "lhcb"}),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "url", "body"), BODY_ENDPOINTS)
def test_body__an_unknown_field_is_400_naming_it_and_changes_nothing(
    operator_client: APIClient, world: dict[str, str], method: str, url: str, body: Any
) -> None:
    before = snapshot()
    response = getattr(operator_client, method)(
        url.format(**world), {**body, "bogus": 1, "enabled_": True}, format="json"
    )
    assert response.status_code == 400, response.content[:300]
    assert sorted(response.json()) == ["bogus", "enabled_"]
    assert response.json()["bogus"] == ["Unknown field."]
    assert snapshot() == before


@pytest.mark.django_db
def test_body__a_schedule_patched_with_enabled_is_400_and_stays_active(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    # `enabled` is not a field of a schedule (pause/ is): it was dropped, and the answer 200.
    response = operator_client.patch(
        f"/api/schedules/{world['schedule']}/", {"enabled": False}, format="json"
    )
    assert response.status_code == 400
    assert list(response.json()) == ["enabled"]
    assert operator_client.get(f"/api/schedules/{world['schedule']}/").json()["status"] == "ACTIVE"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("patch", "/api/schedules/{schedule}/", {"status": "PAUSED"}, "status"),
        ("patch", "/api/schedules/{schedule}/", {"scheduler": "spare"}, "scheduler"),
        ("post", "/api/schedulers/", {"id": "fresh", "paused": True}, "paused"),
        ("patch", "/api/schedulers/spare/", {"id": "other"}, "id"),
        ("post", "/api/schedulers/", {"id": "fresh", "counts": {}}, "counts"),
        ("patch", "/api/compute-elements/ce-b/", {"status": "BANNED"}, "status"),
        (
            "post",
            "/api/vos/",
            {"name": "atlas", "created_at": "2030-01-01T00:00:00Z"},
            "created_at",
        ),
    ],
)
def test_body__a_read_only_field_is_400_naming_it_and_changes_nothing(
    operator_client: APIClient,
    world: dict[str, str],
    method: str,
    url: str,
    body: Any,
    field: str,
) -> None:
    before = snapshot()
    response = getattr(operator_client, method)(url.format(**world), body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert response.json() == {field: ["Read-only: it cannot be set here."]}
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "url", "body"), BODY_ENDPOINTS)
def test_body__a_valid_body_is_still_taken(
    operator_client: APIClient, world: dict[str, str], method: str, url: str, body: Any
) -> None:
    response = getattr(operator_client, method)(url.format(**world), body, format="json")
    assert response.status_code in {200, 201}, response.content[:300]


# --- unknown query parameters -----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "parameter"),
    [
        ("/api/tasks/?scheduler_id=x", "scheduler_id"),  # listed every task
        ("/api/tasks/?limit=abc", "limit"),  # tasks page with page_size, not limit
        ("/api/tasks/?limit=5", "limit"),
        ("/api/tasks/?offset=5", "offset"),
        ("/api/schedules/?enabled=false", "enabled"),
        ("/api/schedulers/?page_size=5", "page_size"),  # schedulers page with limit/offset
        ("/api/schedulers/?cursor=abc", "cursor"),
        ("/api/vos/?name=lhcb", "name"),
        ("/api/compute-elements/?status=ACTIVE", "status"),
        ("/api/pilots/?state=RUNNING", "state"),
        ("/api/tasks/stats/?hour=3", "hour"),
        ("/api/tasks/{queued}/?bogus=1", "bogus"),
        ("/api/tasks/{queued}/events/?bogus=1", "bogus"),
        ("/api/schedules/{schedule}/?bogus=1", "bogus"),
    ],
)
def test_query__an_unknown_parameter_is_400_naming_it(
    operator_client: APIClient, world: dict[str, str], url: str, parameter: str
) -> None:
    response = operator_client.get(url.format(**world))
    assert response.status_code == 400, response.content[:300]
    assert list(response.json()) == [parameter]
    assert response.json()[parameter][0].startswith("Unknown parameter")


@pytest.mark.django_db
def test_query__unknown_parameters_are_named_together(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    response = operator_client.get("/api/tasks/?b=1&status=QUEUED&a=2")
    assert response.status_code == 400
    assert sorted(response.json()) == ["a", "b"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/api/tasks/?page_size=1&format=json&status=QUEUED",
        "/api/schedules/?page_size=1&scheduler=boefje",
        "/api/schedulers/?limit=1&offset=1&format=json",
        "/api/vos/?limit=1",
        "/api/pilots/?limit=1&vo=lhcb",
        "/api/tasks/stats/?hours=2&format=json",
        "/api/tasks/{queued}/?format=json",
    ],
)
def test_query__pagination_format_and_filters_are_known(
    operator_client: APIClient, world: dict[str, str], url: str
) -> None:
    response = operator_client.get(url.format(**world))
    assert response.status_code == 200, response.content[:300]


@pytest.mark.django_db
def test_query__the_next_cursor_is_a_known_parameter(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    first = operator_client.get("/api/tasks/", {"page_size": 1, "status": ["QUEUED", "DEAD"]})
    second = operator_client.get(first.json()["next"])
    assert second.status_code == 200
    assert len(second.json()["results"]) == 1


# --- deep JSON --------------------------------------------------------------------------------


def _nested(depth: int) -> str:
    """A push body whose depth (the outer object counting 1) is `depth`."""
    return '{"data": ' + '{"a": ' * (depth - 2) + "{}" + "}" * (depth - 2) + "}"


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [65, 950, 100_000])
def test_body__json_nested_deeper_than_64_is_400(
    operator_client: APIClient, world: dict[str, str], depth: int
) -> None:
    before = snapshot()
    response = operator_client.post(
        "/api/schedulers/boefje/push/", _nested(depth), content_type="application/json"
    )
    assert response.status_code == 400, response.content[:300]
    assert response.json() == {"detail": "JSON nested deeper than 64 levels."}
    assert snapshot() == before


@pytest.mark.django_db
def test_body__json_nested_deeper_than_64_in_a_list_is_400(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    body = '{"data": {"a": ' + "[" * 64 + "]" * 64 + "}}"
    response = operator_client.post(
        "/api/schedulers/boefje/push/", body, content_type="application/json"
    )
    assert response.status_code == 400
    assert "64" in response.json()["detail"]


@pytest.mark.django_db
def test_body__json_nested_64_deep_is_taken(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    response = operator_client.post(
        "/api/schedulers/boefje/push/", _nested(64), content_type="application/json"
    )
    assert response.status_code == 201, response.content[:300]
    # Strings that look like brackets are not nesting.
    body = '{"data": {"a": "' + "[{" * 500 + '"}}'
    response = operator_client.post(
        "/api/schedulers/boefje/push/", body, content_type="application/json"
    )
    assert response.status_code == 201, response.content[:300]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/api/schedulers/spare/pause/",
        "/api/tasks/{queued}/cancel/",
        "/api/tasks/{failed}/requeue/",
        "/api/schedules/{schedule}/pause/",
        "/api/schedules/{schedule}/trigger/",
        "/api/compute-elements/ce-b/drain/",
    ],
)
def test_body__an_action_that_takes_none_refuses_one_and_changes_nothing(
    operator_client: APIClient, world: dict[str, str], url: str
) -> None:
    # A reason sent to cancel/ was dropped silently, the task cancelled without it.
    before = snapshot()
    path = url.format(**world)
    response = operator_client.post(path, {"reason": "tidy up"}, format="json")
    listed = operator_client.post(path, [1], format="json")

    assert response.status_code == 400
    assert response.json() == {"reason": ["Unknown field: this action takes no body."]}
    assert listed.status_code == 400 and listed.json() == {"detail": "This action takes no body."}
    assert snapshot() == before
    assert operator_client.post(path).status_code in {200, 201}  # no body at all


@pytest.mark.django_db
def test_body__an_action_that_takes_none_accepts_an_empty_object(
    operator_client: APIClient, world: dict[str, str]
) -> None:
    response = operator_client.post(f"/api/tasks/{world['queued']}/cancel/", {}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"


@pytest.mark.django_db
def test_schema__pop_documents_the_409_of_a_celery_queue(operator_client: APIClient) -> None:
    services.scheduler_create(id="echo", kind="celery", handler="demo.echo")
    response = operator_client.post("/api/schedulers/echo/pop/", {}, format="json")
    schema = operator_client.get("/api/schema/?format=json").json()

    assert response.status_code == 409
    assert "409" in schema["paths"]["/api/schedulers/{id}/pop/"]["post"]["responses"]


@pytest.mark.django_db
def test_body__larger_than_the_upload_limit_is_a_json_400(
    runner_client: APIClient, settings: Any
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"reports": [{"id": "x" * 2000, "status": "COMPLETED"}]}

    response = runner_client.post("/api/tasks/report/", body, format="json")

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "1000 bytes" in response.json()["detail"]


@pytest.mark.parametrize(
    ("accept", "query"),
    [
        (None, ""),
        ("*/*", ""),
        ("application/json", ""),
        ("application/json", "?format=api"),
        ("text/html", ""),
        ("application/json; indent=4", ""),
        ("text/html,application/xhtml+xml,*/*;q=0.8", ""),
        ("image/png", ""),
    ],
)
def test_content_negotiation__answers_as_drfs_own(accept: str | None, query: str) -> None:
    """The shortcut for JSON and */* picks what DRF's matching picks; the rest is DRF's."""
    from django.test import RequestFactory
    from rest_framework.exceptions import NotAcceptable
    from rest_framework.negotiation import DefaultContentNegotiation
    from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
    from rest_framework.request import Request

    from scheduler_site.api_input import ContentNegotiation

    headers = {} if accept is None else {"HTTP_ACCEPT": accept}
    request = Request(RequestFactory().post(f"/api/x/{query}", **headers))
    renderers = [JSONRenderer(), BrowsableAPIRenderer()]

    def pick(negotiator: Any) -> Any:
        try:
            renderer, media_type = negotiator.select_renderer(request, renderers)
        except NotAcceptable:
            return "406"
        return type(renderer), media_type

    assert pick(ContentNegotiation()) == pick(DefaultContentNegotiation())
