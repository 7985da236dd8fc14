"""API tokens (issue 10, item 9): stored as digests, shown once, revocable, optionally
expiring, under the header runners have always sent (`Authorization: Token <key>`)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import accounts


def client_with(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def stored_values() -> list[str]:
    """Every value of every token row, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {AuthToken._meta.db_table}")
        return [str(value) for row in cursor.fetchall() for value in row]


@pytest.mark.django_db
def test_token__the_database_holds_its_digest_never_the_key(runner: User) -> None:
    token, key = accounts.token_create(user=runner)

    assert len(key) >= 64
    values = stored_values()
    assert values and not any(key in value for value in values)
    assert token.digest == hashlib.sha512(key.encode()).hexdigest()
    assert client_with(key).get("/api/tasks/").status_code == 200


@pytest.mark.django_db
def test_token__without_expiry_by_default(runner: User, time_machine: TimeMachineFixture) -> None:
    """knox's own default is 10 hours: it would stop every runner overnight."""
    token, key = accounts.token_create(user=runner)
    assert token.expiry is None
    time_machine.move_to(timezone.now() + timedelta(days=400), tick=False)
    assert client_with(key).get("/api/tasks/").status_code == 200


@pytest.mark.django_db
def test_token__expired_is_refused(runner: User, time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(timezone.now(), tick=False)
    _token, key = accounts.token_create(user=runner, expires_in=timedelta(hours=1))
    client = client_with(key)
    assert client.get("/api/tasks/").status_code == 200

    time_machine.shift(timedelta(hours=1, seconds=1))
    response = client.get("/api/tasks/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.django_db
def test_token__revoked_is_refused(runner: User) -> None:
    token, key = accounts.token_create(user=runner)
    _other, other_key = accounts.token_create(user=runner)
    assert client_with(key).get("/api/tasks/").status_code == 200

    call_command("api_token", "revoke", accounts.token_id(token), stdout=StringIO())

    assert client_with(key).get("/api/tasks/").status_code == 401
    assert client_with(other_key).get("/api/tasks/").status_code == 200, "only that one"


@pytest.mark.django_db
def test_token__inactive_account_is_refused(runner: User) -> None:
    _token, key = accounts.token_create(user=runner)
    User.objects.filter(pk=runner.pk).update(is_active=False)
    assert client_with(key).get("/api/tasks/").status_code == 401


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["\xe9t\xe9", "0" * 64, "", "a b"])
def test_token__malformed_or_unknown_is_401_never_500(runner: User, key: str) -> None:
    accounts.token_create(user=runner)
    client = APIClient()
    # A latin-1 byte that is no UTF-8 (knox would decode it unguarded), no key, two words.
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}".rstrip())
    assert client.get("/api/tasks/").status_code == 401
