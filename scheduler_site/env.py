"""Typed readers for environment variables, and the local env file of `make run`.

Every reader raises ImproperlyConfigured naming the variable, so a bad deployment fails at
start with a message an operator can act on instead of a traceback deep inside Django.

`python -m scheduler_site.env PATH` writes the local env file once (DEBUG on and a fresh
SECRET_KEY, mode 0600): the settings read it, so every `manage.py` command of a `make run`
checkout works without exporting anything, and every process signs with the same key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from pathlib import Path

import dotenv
from django.core.exceptions import ImproperlyConfigured

# Django's `check --deploy` (security.W009) asks for at least this many characters.
SECRET_KEY_MIN_LENGTH = 50

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no."
    )


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


_RATE = re.compile(r"[0-9]+/(s|sec|second|m|min|minute|h|hour|d|day)")


def env_rate(name: str, default: str) -> str:
    """A DRF throttle rate, `<number>/<s|min|hour|day>` (DRF would fail on every request)."""
    value = env_str(name, default)
    if not _RATE.fullmatch(value):
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a rate; use <number>/<s|min|hour|day>, e.g. 60/min."
        )
    return value


def env_commands(name: str, default: dict[str, list[str]]) -> dict[str, list[str]]:
    """A JSON object of command name -> argv (a non-empty list of strings), e.g.
    `{"sleep": ["sleep", "5"]}`: the only commands the server will run (no shell)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"{name} is not valid JSON ({exc.msg}).") from None
    if not isinstance(value, dict) or not all(
        key.strip() and _is_argv(argv) for key, argv in value.items()
    ):
        raise ImproperlyConfigured(
            f"{name} must be a JSON object of name -> argv, a non-empty list of strings, "
            'e.g. {"sleep": ["sleep", "5"]}.'
        )
    return value


def _is_argv(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(part, str) and "\x00" not in part for part in value)
        and bool(value[0].strip())
    )


def load_env_file(path: Path | None) -> bool:
    """Read `path` into os.environ, never overriding a variable that is already set (the real
    environment wins). Returns whether the file was there."""
    if path is None or not path.is_file():
        return False
    dotenv.load_dotenv(path, override=False)
    return True


def env_file_path(default: Path) -> Path | None:
    """SCHEDULER_ENV_FILE names the env file; set but empty, no file is read (the tests)."""
    raw = os.environ.get("SCHEDULER_ENV_FILE")
    if raw is None:
        return default
    return Path(raw.strip()) if raw.strip() else None


def check_secret_key(key: str) -> None:
    """Refuse a production key that Django's `check --deploy` would call weak (W009)."""
    if len(key) < SECRET_KEY_MIN_LENGTH:
        raise ImproperlyConfigured(
            f"SECRET_KEY must be at least {SECRET_KEY_MIN_LENGTH} characters long "
            f"(it has {len(key)}); generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`."
        )
    if len(set(key)) < 5 or key.startswith("django-insecure-"):
        raise ImproperlyConfigured("SECRET_KEY is not random enough; generate a new one.")


def write_env_file(path: Path) -> bool:
    """Create the local development env file unless it exists (a key, once written, is kept:
    a new one would end every session). Returns whether it was written."""
    content = (
        "# Written once by `make run` for this checkout only; not for production, never commit.\n"
        "# Variables set in the real environment take precedence over these.\n"
        "DEBUG=1\n"
        f"SECRET_KEY={secrets.token_urlsafe(SECRET_KEY_MIN_LENGTH)}\n"
    )
    try:
        # O_EXCL: never overwrite; 0600: the key is readable by its owner only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m scheduler_site.env PATH", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if write_env_file(path):
        print(f"wrote {path} (DEBUG=1 and a new SECRET_KEY, mode 0600)")
    else:
        print(f"{path} exists; kept as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
