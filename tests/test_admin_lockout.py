"""Repeated failed admin logins lock that username out from that address (issue 10, item 9),
through django-axes; test clients still log in."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.exceptions import AxesBackendRequestParameterRequired
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.http import HttpRequest
from django.test import Client
from django.utils import timezone
from time_machine import TimeMachineFixture

PASSWORD = "Correct-horse-battery-9"
LOGIN = "/admin/login/?next=/admin/"
# The documented defaults (README, ADMIN_LOGIN_FAILURE_LIMIT / ADMIN_LOGIN_COOLOFF_MINUTES).
LIMIT = 5
COOL_OFF = timedelta(minutes=15)


@pytest.fixture
def admin_user(db: None) -> User:
    return User.objects.create_user("admin", password=PASSWORD, is_staff=True, is_superuser=True)


def log_in(password: str, address: str = "10.0.0.1") -> tuple[int, bool]:
    """(status, signed in) of one admin login form post from `address`."""
    client = Client(REMOTE_ADDR=address)
    response = client.post(LOGIN, {"username": "admin", "password": password})
    return response.status_code, "_auth_user_id" in client.session


def test_admin_login__locked_out_after_the_failure_limit(
    admin_user: User, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(timezone.now(), tick=False)
    for _ in range(LIMIT - 1):
        assert log_in("wrong") == (200, False)  # the form again, with its error
    assert log_in(PASSWORD) == (302, True), "below the limit; a success resets the count"

    for _ in range(LIMIT):
        log_in("wrong")
    assert log_in(PASSWORD) == (429, False), "locked out: the right password is refused too"
    assert log_in(PASSWORD, address="10.0.0.2") == (302, True), "not from another address"

    time_machine.shift(COOL_OFF + timedelta(seconds=1))
    assert log_in(PASSWORD) == (302, True), "after the cool-off"


def test_admin_login__test_clients_still_log_in(admin_user: User) -> None:
    client = Client()
    client.force_login(admin_user)
    assert client.get("/admin/").status_code == 200
    other = Client()
    # django-axes needs the request of every authenticate(); the test client has none of its
    # own, so it is given one.
    assert other.login(request=HttpRequest(), username="admin", password=PASSWORD)
    assert other.get("/admin/").status_code == 200


def test_admin_login__authenticate_without_a_request_is_refused(admin_user: User) -> None:
    """So a code path that authenticates without the request (and so past the lockout)
    fails loudly in its tests instead of going unthrottled."""
    with pytest.raises(AxesBackendRequestParameterRequired):
        authenticate(username="admin", password=PASSWORD)
