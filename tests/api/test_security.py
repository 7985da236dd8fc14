"""Throttling, production settings (check --deploy, refusals at start) and NUL refusals."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient
from rest_framework.throttling import SimpleRateThrottle

from tasks.models import Scheduler
from tests.tasks.helpers import snapshot

BASE_DIR = Path(settings.BASE_DIR)


@pytest.fixture
def rates(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Tiny throttle rates for one test, on a cleared throttle cache (rates are read per
    request from the class attribute; the history lives in the default cache)."""
    low = {"anon": "3/min", "user": "4/min"}
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", low)
    cache.clear()
    yield low
    cache.clear()


def _assert_throttled(response: object) -> None:
    assert response.status_code == 429, response.content[:300]
    assert 0 < int(response["Retry-After"]) <= 60
    assert "throttled" in response.json()["detail"].lower()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/api/schedulers/",
        "/api/tasks/",
        "/api/pilots/summary/",
        "/metrics",
        "/api/schema/?format=json",
    ],
)
def test_throttle__anonymous_beyond_the_rate_gets_429_with_retry_after(
    rates: dict[str, str], anon_client: APIClient, url: str
) -> None:
    # Refused (401) all the same, but counted: token guessing is slowed down.
    assert [anon_client.get(url).status_code for _ in range(3)] == [401, 401, 401]
    _assert_throttled(anon_client.get(url))


@pytest.mark.django_db
def test_throttle__a_bad_token_counts_as_anonymous(
    rates: dict[str, str], anon_client: APIClient, scheduler: Scheduler
) -> None:
    guesser = APIClient()
    guesser.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    before = snapshot()
    assert [guesser.post("/api/schedulers/boefje/pause/").status_code for _ in range(2)] == [
        401,
        401,
    ]
    assert anon_client.get("/api/schedulers/").status_code == 401  # same address, same bucket
    _assert_throttled(guesser.post("/api/schedulers/boefje/pause/"))
    _assert_throttled(anon_client.get("/api/schedulers/"))
    assert snapshot() == before


@pytest.mark.django_db
def test_throttle__an_authenticated_user_beyond_the_user_rate_gets_429(
    rates: dict[str, str], operator_client: APIClient, runner_client: APIClient
) -> None:
    assert [operator_client.get("/api/schedulers/").status_code for _ in range(4)] == [200] * 4
    _assert_throttled(operator_client.get("/api/tasks/"))
    # Per account: another user still has its own allowance, and anonymous its own.
    assert runner_client.get("/api/schedulers/").status_code == 200


@pytest.mark.django_db
def test_throttle__healthz_is_not_throttled(rates: dict[str, str], anon_client: APIClient) -> None:
    assert {anon_client.get("/healthz").status_code for _ in range(6)} == {200}


# --- production settings ----------------------------------------------------------------------

SECRET = secrets.token_urlsafe(50)


def _production_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    """A clean environment (none of the test settings' variables) with production values."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings",
        "SCHEDULER_VAR_DIR": str(tmp_path),
        "SCHEDULER_ENV_FILE": "",  # never the checkout's .env of `make run`
        "DEBUG": "0",
        "SECRET_KEY": SECRET,
        "ALLOWED_HOSTS": "scheduler.example.org",
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_settings__check_deploy_passes_with_production_environment(tmp_path: Path) -> None:
    done = _run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], _production_env(tmp_path)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SECRET_KEY", None),
        ("SECRET_KEY", "too-short-a-key"),
        # 49 characters: what `check --deploy` calls weak (W009), even though random.
        ("SECRET_KEY", SECRET[:49]),
        ("SECRET_KEY", "a" * 60),
        ("ALLOWED_HOSTS", None),
        ("ALLOWED_HOSTS", " , "),
        ("DATABASE_URL", "mysql://user:pass@db/scheduler"),
        ("CELERY_BROKER_URL", "sqs://queue"),
        ("TASK_RETENTION_DAYS", "seven"),
        ("TASK_RETENTION_DAYS", "0"),
        ("DEBUG", "maybe"),
        ("API_THROTTLE_ANON", "60 per minute"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_settings__refuse_to_start_naming_the_variable(
    tmp_path: Path, variable: str, value: str | None
) -> None:
    done = _run(
        ["-c", "import django; django.setup()"], _production_env(tmp_path, **{variable: value})
    )
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr
    assert variable in done.stderr.strip().splitlines()[-1], done.stderr[-500:]


def test_settings__the_production_environment_itself_starts(tmp_path: Path) -> None:
    """The refusals above are the variables', not a broken base environment."""
    done = _run(["-c", "import django; django.setup()"], _production_env(tmp_path))
    assert done.returncode == 0, done.stderr[-500:]


# --- NUL characters (schemathesis generates none: the schema cannot say where they are refused)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("post", "/api/schedulers/boefje/push/", {"data": {"org": ["a\x00b"]}}, "data"),
        ("post", "/api/schedulers/boefje/push/", {"data": {"k\x00": 1}}, "data"),
        ("post", "/api/schedulers/boefje/push/", {"hash": "h\x00"}, "hash"),
        ("patch", "/api/schedulers/boefje/", {"description": "\x00"}, "description"),
        ("post", "/api/schedulers/boefje/pop/", {"filters": {"org": "\x00"}}, "filters"),
        ("post", "/api/schedules/", {"scheduler": "boefje", "cron": "\x00"}, "cron"),
        (
            "post",
            "/api/compute-elements/",
            {"name": "ce", "backend_settings": {"x": "\x00"}},
            "backend_settings",
        ),
        ("get", "/api/tasks/?hash=%00", None, "hash"),
        ("get", "/api/schedules/?scheduler=%00", None, "scheduler"),
        ("get", "/api/tasks/stats/?scheduler=%00", None, "scheduler"),
    ],
)
def test_nul__refused_with_400_naming_the_field_and_nothing_changes(
    operator_client: APIClient,
    scheduler: Scheduler,
    method: str,
    url: str,
    body: object,
    field: str,
) -> None:
    before = snapshot()
    if method == "get":
        response = operator_client.get(url)
    else:
        response = getattr(operator_client, method)(url, body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert field in response.json()
    assert snapshot() == before
