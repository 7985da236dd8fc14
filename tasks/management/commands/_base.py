from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from scheduler_site.api_input import MAX_JSON_DEPTH, TOO_DEEP, json_depth
from tasks.exceptions import QueueError


def parse_json_object(raw: str | None, *, option: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    except RecursionError:
        raise CommandError(f"{option}: {TOO_DEEP}") from None  # as the API refuses it
    if json_depth(value) > MAX_JSON_DEPTH:
        raise CommandError(f"{option}: {TOO_DEEP}")
    if not isinstance(value, dict):
        raise CommandError(f"{option}: must be a JSON object.")
    return value


def as_command_error(exc: QueueError) -> CommandError:
    return CommandError(f"{exc.message} (HTTP equivalent: {exc.http_status})")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


class SubcommandCommand(BaseCommand):
    """A command with subcommands (`manage.py task push …`): `handle` calls `_<action>` and
    turns domain errors into CommandErrors that name the problem, as the API's 4xx do."""

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            getattr(self, f"_{action.replace('-', '_')}")(**options)
        except QueueError as exc:
            raise as_command_error(exc) from None
        except ValidationError as exc:
            details = "; ".join(
                f"{field}: {' '.join(messages)}" for field, messages in exc.message_dict.items()
            )
            raise CommandError(f"invalid: {details}") from None
