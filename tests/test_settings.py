"""The settings' local env file (`make run`'s .env) and the production key rules; each case in a
fresh interpreter, as the settings are read once per process."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler_site.env import write_env_file

ROOT = Path(__file__).resolve().parent.parent
FILE_KEY = secrets.token_urlsafe(50)
REAL_KEY = secrets.token_urlsafe(50)
SHOW = (
    "import django; django.setup(); from django.conf import settings; "
    f"print(settings.DEBUG, {{{FILE_KEY!r}: 'file', {REAL_KEY!r}: 'real'}}"
    ".get(settings.SECRET_KEY, 'other'))"
)


def settings_of(tmp_path: Path, code: str = SHOW, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings",
        "SCHEDULER_VAR_DIR": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "local.env"
    path.write_text(f"# a comment\nDEBUG=1\nSECRET_KEY={FILE_KEY}\n")
    return path


def test_env_file__read_when_the_environment_does_not_say(tmp_path: Path, env_file: Path) -> None:
    done = settings_of(tmp_path, SCHEDULER_ENV_FILE=str(env_file))
    assert done.stdout.split() == ["True", "file"], done.stderr[-500:]


def test_env_file__the_real_environment_wins(tmp_path: Path, env_file: Path) -> None:
    done = settings_of(
        tmp_path,
        SCHEDULER_ENV_FILE=str(env_file),
        DEBUG="0",
        SECRET_KEY=REAL_KEY,
        ALLOWED_HOSTS="scheduler.example.org",
    )
    assert done.stdout.split() == ["False", "real"], done.stderr[-500:]


def test_env_file__without_one_production_still_needs_a_key(tmp_path: Path) -> None:
    done = settings_of(tmp_path, SCHEDULER_ENV_FILE=str(tmp_path / "missing.env"))
    assert done.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in done.stderr


def test_settings__secret_key_of_49_characters_is_refused(tmp_path: Path) -> None:
    done = settings_of(
        tmp_path, SCHEDULER_ENV_FILE="", SECRET_KEY=REAL_KEY[:49], ALLOWED_HOSTS="example.org"
    )
    assert done.returncode != 0
    assert "SECRET_KEY must be at least 50 characters long (it has 49)" in done.stderr


def test_settings__debug_without_a_key_signs_with_a_random_one(tmp_path: Path) -> None:
    """Never with a key written in the repository: each process makes its own."""
    show_key = "import django; django.setup(); from django.conf import settings; "
    show_key += "print(settings.SECRET_KEY)"
    keys = [
        settings_of(tmp_path, show_key, SCHEDULER_ENV_FILE="", DEBUG="1").stdout.strip()
        for _ in range(2)
    ]
    assert len(keys[0]) >= 50 and keys[0] != keys[1]


def test_write_env_file__once_owner_only(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    assert write_env_file(path)
    content = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "DEBUG=1\n" in content
    [key] = [line[len("SECRET_KEY=") :] for line in content.splitlines() if "SECRET_KEY=" in line]
    assert len(key) >= 50

    assert not write_env_file(path)
    assert path.read_text() == content, "an existing file, and its key, are kept"
