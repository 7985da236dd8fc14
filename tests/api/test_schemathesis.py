"""Property-based tests of the whole REST API: schemathesis generates requests from the OpenAPI
schema served at /api/schema/ and sends them to the WSGI application, as an operator, against a
database seeded with one of everything (so paths with ids sometimes hit real objects).

For every generated request: no 5xx, a status code the schema documents, the documented
content type, a body that matches the documented schema, bad input refused and valid input
accepted (schemathesis' default checks). Each request runs in a savepoint that is rolled back
(`_isolated`), so every request sees the same seeded database, and a database error in one
(which aborts a PostgreSQL transaction) cannot spill into the next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from scheduler_site.wsgi import application
from tasks import accounts

MAX_EXAMPLES = 20


def _generated_schema() -> dict[str, Any]:
    """The schema /api/schema/ serves (test_schema_under_test_is_the_served_one checks that),
    built without a request: the module needs it at collection time, before any database."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(schema))


def _isolated(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The WSGI application, each request in a savepoint of the test's transaction, rolled
    back once the response is read."""
    with transaction.atomic():
        try:
            response = application(environ, start_response)
            try:
                return [b"".join(response)]
            finally:
                response.close()
        finally:
            transaction.set_rollback(True)


schema = schemathesis.openapi.from_dict(_generated_schema())
schema.app = _isolated
# The API refuses U+0000 in every string, JSON values included (PostgreSQL's text and jsonb
# cannot hold it), which OpenAPI cannot state for free-form JSON: generate none, and
# test_security checks the refusals.
schema.config.generation.update(allow_x00=False)

# positive_data_acceptance (a request that matches the schema must not get a 400) cannot apply
# where validity depends on what OpenAPI cannot state: other rows, registries, cross-field rules,
# syntaxes. Only that check is left out, only for these operations; the rules themselves are
# tested in tests/tasks, tests/schedules and tests/pilots.
VALID_BEYOND_SCHEMA = {
    "POST /api/schedulers/": "a registered handler for celery; retry cap ≥ delay; a new id; "
    "a policy weight above 0",
    "PATCH /api/schedulers/{id}/": "a registered handler for celery; retry cap ≥ delay; a policy "
    "weight above 0",
    "POST /api/schedulers/{id}/pop/": "filter keys' pattern (needs OpenAPI 3.1 propertyNames)",
    "POST /api/schedulers/{id}/push/": "expires_at in the future and after not_before",
    "POST /api/schedules/": "an existing scheduler; cron syntax, matching some day; IANA zone; one "
    "of cron/interval/run_at; start < end; min ≤ max interval",
    "PATCH /api/schedules/{id}/": "cron syntax, matching some day; IANA zone; one of cron/interval/"
    "run_at; windows",
    "POST /api/compute-elements/": "existing VOs; a new name",
    "PATCH /api/compute-elements/{name}/": "existing VOs",
    "POST /api/vos/": "a new name",
}

# negative_data_rejection (a request that breaks the schema must get a 4xx) cannot apply to a
# batch that answers per item: a batch push of bad items is a 200 whose items are each a 400
# with their errors (DESIGN 9.3); tests/tasks/test_batches.py checks those answers.
ANSWERED_PER_ITEM = {"POST /api/schedulers/{id}/push/"}

# Ids of the seeded objects, filled by the `seeded` fixture and read when hypothesis draws a
# path parameter (a strategy's map runs at draw time, after the fixture).
SEEDED: dict[str, list[str]] = {}


def _kind(path: str) -> str:
    return path.split("/")[2]  # /api/<kind>/...


@schema.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> Any:
    """Half the time, replace the generated id or name with a seeded one."""
    if ctx.operation is None or not path_parameters:
        return st.just(path_parameters)
    kind = _kind(ctx.operation.path)
    [(key, _value)] = path_parameters.items()
    seeded = st.integers(min_value=0, max_value=99).map(
        lambda i: {**path_parameters, key: SEEDED[kind][i % len(SEEDED[kind])]}
    )
    return st.one_of(st.just(path_parameters), seeded)


@pytest.fixture
def seeded(world: dict[str, str]) -> Iterator[None]:
    SEEDED.update(
        {
            "schedulers": ["boefje", "spare"],
            "tasks": [world["queued"], world["dispatched"], world["failed"]],
            "schedules": [world["schedule"], world["paused_schedule"]],
            "vos": ["lhcb"],
            "compute-elements": ["ce-a", "ce-b", "ce-c"],
            "pilots": [world["pilot"]],
        }
    )
    yield
    SEEDED.clear()


@pytest.fixture
def operator_token(operator: User) -> str:
    return accounts.token_create(user=operator)[1]


@pytest.fixture
def _keep_connection() -> Iterator[None]:
    """The WSGI handler closes the database connection when a request ends (inside the test's
    transaction it looks unusable); Django's test client disconnects the same receivers."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.mark.django_db
def test_schema_under_test_is_the_served_one(operator_client: APIClient) -> None:
    served = operator_client.get("/api/schema/?format=json")
    assert served.status_code == 200
    assert served.json() == _generated_schema()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api(
    case: schemathesis.Case,
    seeded: None,
    operator_token: str,
    _keep_connection: None,
) -> None:
    excluded = [positive_data_acceptance] if case.operation.label in VALID_BEYOND_SCHEMA else []
    if case.operation.label in ANSWERED_PER_ITEM and isinstance(case.body, list):
        excluded.append(negative_data_rejection)
    case.call_and_validate(
        headers={"Authorization": f"Token {operator_token}"}, excluded_checks=excluded
    )
