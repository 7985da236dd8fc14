"""setup_demo's runner account and its token file (var/demo-runner.token for `make run`)."""

from __future__ import annotations

import stat
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from knox.models import AuthToken

from tasks import accounts, selectors

pytestmark = pytest.mark.django_db


def setup_demo(token_file: Path) -> str:
    call_command("setup_demo", token_file=str(token_file), stdout=StringIO())
    return token_file.read_text()


def test_setup_demo__token_file_owner_only_and_kept_while_valid(tmp_path: Path) -> None:
    token_file = tmp_path / "demo-runner.token"
    key = setup_demo(token_file)

    runner = User.objects.get(username="demo-runner")
    assert accounts.token_matches(user=runner, key=key)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert setup_demo(token_file) == key, "a second run keeps the runner's token"
    assert AuthToken.objects.filter(user=runner).count() == 1


def test_setup_demo__an_invalid_token_file_is_replaced(tmp_path: Path) -> None:
    token_file = tmp_path / "demo-runner.token"
    old = setup_demo(token_file)
    token_file.write_text("a key from an older database")
    token_file.chmod(0o644)

    new = setup_demo(token_file)
    runner = User.objects.get(username="demo-runner")
    assert new != old and accounts.token_matches(user=runner, key=new)
    assert not accounts.token_matches(user=runner, key=old), "the lost key is revoked"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_setup_demo__the_runner_is_limited_to_the_pull_queue(tmp_path: Path) -> None:
    setup_demo(tmp_path / "token")
    runner = User.objects.get(username="demo-runner")
    assert selectors.runner_queues(runner) == frozenset({"demo-pull"})
