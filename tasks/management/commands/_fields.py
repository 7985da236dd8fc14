"""Command options made from the API's serializer fields, and their values validated by that
serializer: the CLI takes what the API takes, under the field's name (`--max-queue-size`),
typed and checked the same way. A field added to a serializer (or to SCHEDULER_SETTABLE) is
an option of `create` and `update` with no change here."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.core.management.base import CommandError, CommandParser
from django.db import models
from django.utils.dateparse import parse_datetime
from rest_framework import fields as drf
from rest_framework import relations, serializers

from tasks.management.commands._base import parse_json_object

YES_NO = {"yes": True, "no": False}
UNCHANGED = "(default: unchanged)"

# Help for fields whose model and serializer have none (theirs wins when they have some);
# "Serializer.field" before "field".
FIELD_HELP = {
    "kind": "pull: external runners pop over the REST API; celery: a handler on the workers.",
    "description": "Free text shown in the admin and the API.",
    "retry_policy": "After a failed attempt: none, fixed delay, or exponential backoff.",
    "policy_weights": 'Orchestrator policy weights, e.g. {"most_overdue_first": 49, '
    '"never_run_first": 49, "least_recently_run_first": 2}.',
    "scheduler": "The queue (scheduler id) the schedule's tasks go to.",
    "hash": "Dedup key, unique per scheduler; commands take it for the schedule's id.",
    "TaskPushSerializer.hash": "Dedup key: at most one active task per hash in the queue.",
    "data": 'The task\'s payload, a JSON object, e.g. {"org": "acme"}.',
    "priority": "Lower runs first.",
    "not_before": "Not handed out before this time (ISO 8601 with offset).",
    "interval_seconds": "Run every this many seconds (instead of --cron or --run-at).",
    "timezone": "IANA time zone the cron expression is evaluated in, e.g. Europe/Amsterdam.",
    "start_at": "No run before this time (ISO 8601 with offset).",
    "end_at": "No run after this time; the schedule is then FINISHED (ISO 8601 with offset).",
    "min_interval_seconds": "Adaptive interval: the shortest it may get.",
    "max_interval_seconds": "Adaptive interval: the longest it may get.",
    "enabled": "Whether the VO's pilot cycles run.",
    "vos": "The VOs this CE serves (names; give none to clear).",
    "backend": "How pilots are submitted: simulated, or local processes.",
    "backend_settings": 'The backend\'s settings, a JSON object (local: {"command": NAME} '
    "of PILOT_LOCAL_COMMANDS).",
}


def writable(
    serializer_class: type[serializers.Serializer], *, exclude: Sequence[str] = ()
) -> list[str]:
    """The fields a client may write, in the serializer's order (no database query)."""
    return [
        name
        for name, field in serializer_class().get_fields().items()
        if not field.read_only and name not in exclude
    ]


def option_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_field_options(
    parser: CommandParser,
    serializer_class: type[serializers.Serializer],
    names: Sequence[str],
    *,
    updating: bool,
) -> None:
    fields = serializer_class().get_fields()
    model = getattr(getattr(serializer_class, "Meta", None), "model", None)
    for name in names:
        field = fields[name]
        kwargs = _argparse_kwargs(field)
        kwargs["help"] = _help(
            name, field, model, updating=updating, owner=serializer_class.__name__
        )
        kwargs["required"] = field.required and not updating
        parser.add_argument(option_name(name), dest=name, **kwargs)


def _argparse_kwargs(field: drf.Field) -> dict[str, Any]:
    if isinstance(field, relations.ManyRelatedField):
        return {"nargs": "*", "metavar": "NAME"}
    if isinstance(field, relations.RelatedField):
        return {"metavar": "ID"}
    if isinstance(field, drf.BooleanField):
        return {"choices": list(YES_NO)}
    if isinstance(field, drf.ChoiceField):
        return {"choices": list(field.choices)}
    if isinstance(field, drf.JSONField):
        return {"metavar": "JSON"}
    if isinstance(field, drf.IntegerField):
        return {"type": _nullable(int, field), "metavar": "N"}
    if isinstance(field, drf.FloatField):
        return {"type": _nullable(float, field), "metavar": "X"}
    if isinstance(field, drf.DateTimeField):
        return {"metavar": "ISO-8601"}
    return {}


def _nullable(kind: type, field: drf.Field) -> Any:
    """int/float, and "" for no value where the field may be empty (to clear it on update)."""

    def parse(raw: str) -> Any:
        if raw == "" and field.allow_null:
            return ""
        try:
            return kind(raw)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{raw!r} is not {noun}") from None

    return parse


def _help(
    name: str,
    field: drf.Field,
    model: type[models.Model] | None,
    *,
    updating: bool,
    owner: str,
) -> str:
    text = (
        str(field.help_text or "")
        or FIELD_HELP.get(f"{owner}.{name}")
        or FIELD_HELP.get(name)
        or f"The API's {name!r} field."
    )
    text = text.replace("%", "%%")  # argparse formats help with %
    clears = " '' clears it." if field.allow_null or isinstance(field, drf.DateTimeField) else ""
    if updating:
        return f"{text}{clears} {UNCHANGED}"
    if field.required:
        return f"{text} (required)"
    return f"{text} (default: {_default(name, field, model)})"


def _default(name: str, field: drf.Field, model: type[models.Model] | None) -> str:
    """The serializer field's default, else the model field's (a ModelSerializer leaves
    defaults to the model)."""
    if field.default is not drf.empty:
        value = field.get_default() if callable(field.default) else field.default
        return _shown_value(value)
    try:
        model_field = model._meta.get_field(name) if model else None
    except FieldDoesNotExist:  # a serializer-only field: no model default to show
        model_field = None
    if model_field is None or not model_field.has_default():
        return "none"
    return _shown_value(model_field.get_default())


def _shown_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value).replace("%", "%%")
    return str(getattr(value, "value", value)).replace("%", "%%") or "empty"


def field_values(
    options: Mapping[str, Any], serializer_class: type[serializers.Serializer], names: Sequence[str]
) -> dict[str, Any]:
    """The given options as the API's JSON body would carry them."""
    fields = serializer_class().get_fields()
    body: dict[str, Any] = {}
    for name in names:
        raw = options.get(name)
        if raw is None:
            continue
        field = fields[name]
        if raw == "" and (field.allow_null or isinstance(field, drf.DateTimeField)):
            body[name] = None
        elif isinstance(field, drf.BooleanField):
            body[name] = YES_NO[raw]
        elif isinstance(field, drf.JSONField):
            body[name] = parse_json_object(raw, option=option_name(name))
        elif isinstance(field, drf.DateTimeField):
            body[name] = _with_offset(raw, option=option_name(name))
        else:
            body[name] = raw
    return body


def _with_offset(raw: str, *, option: str) -> str:
    """The API takes a time without offset as UTC; at a shell that is more likely local time
    mistaken, so the command asks for the offset."""
    parsed = parse_datetime(raw)
    if parsed is None or parsed.tzinfo is None:
        raise CommandError(
            f"{option}: {raw!r}: give an ISO 8601 time with its offset, "
            "e.g. 2026-01-31T09:00:00+01:00 or 2026-01-31T08:00:00Z."
        )
    return raw


def validated(
    serializer_class: type[serializers.Serializer],
    body: Mapping[str, Any],
    *,
    instance: Any = None,
    context: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The body checked as the API checks it; refused with every field's reason (`labels`
    names the fields given as positional arguments)."""
    serializer = serializer_class(
        instance, data=dict(body), partial=instance is not None, context=dict(context or {})
    )
    if not serializer.is_valid():
        raise CommandError(f"invalid: {describe_errors(serializer.errors, labels=labels)}")
    return dict(serializer.validated_data)


def describe_errors(errors: Mapping[str, Any], *, labels: Mapping[str, str] | None = None) -> str:
    parts = []
    for name, messages in errors.items():
        shown = (labels or {}).get(name) or option_name(name)
        label = "" if name == "non_field_errors" else f"{shown}: "
        texts = messages if isinstance(messages, list) else [messages]
        parts.append(label + " ".join(_flat(text) for text in texts))
    return "; ".join(parts)


def _flat(message: Any) -> str:
    if isinstance(message, dict):
        return "; ".join(f"{key}: {_flat(value)}" for key, value in message.items())
    if isinstance(message, list):
        return " ".join(_flat(item) for item in message)
    return str(message)


def require_some(body: Mapping[str, Any], names: Sequence[str]) -> None:
    if not body:
        listed = ", ".join(option_name(name) for name in names)
        raise CommandError(f"Nothing to change: give at least one of {listed}.")
