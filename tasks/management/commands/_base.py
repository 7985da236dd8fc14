from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandError

from tasks.exceptions import QueueError


def parse_json_object(raw: str | None, *, option: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    if not isinstance(value, dict):
        raise CommandError(f"{option}: must be a JSON object.")
    return value


def as_command_error(exc: QueueError) -> CommandError:
    return CommandError(f"{exc.message} (HTTP equivalent: {exc.http_status})")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
