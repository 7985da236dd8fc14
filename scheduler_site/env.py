"""Typed readers for environment variables.

Every reader raises ImproperlyConfigured naming the variable, so a bad deployment fails at
start with a message an operator can act on instead of a traceback deep inside Django.
"""

from __future__ import annotations

import json
import os
import re

from django.core.exceptions import ImproperlyConfigured

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
