from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from scheduler_site import tracing
from scheduler_site.api_input import QuerySerializer, StrictTypes, body_errors, validated_body
from scheduler_site.storable import NUL_OR_SURROGATE, unstorable
from tasks import selectors
from tasks.batches import BATCH_MAX
from tasks.models import POLICIES, Scheduler, Task, TaskEvent, TaskStatus, Worker

_FILTER_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,4}$")
_SCALAR = (str, int, float, bool)


def reject_unstorable(value: Any) -> Any:
    """A field's validator: refuse what the database cannot hold (scheduler_site.storable)."""
    why = unstorable(value)
    if why is not None:
        raise serializers.ValidationError(why)
    return value


@extend_schema_field({"type": "object", "additionalProperties": True})
class JSONObjectField(serializers.JSONField):
    """A JSON object, with no NUL character anywhere in it."""

    default_error_messages = {"not_an_object": "Must be a JSON object."}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            self.fail("not_an_object")
        return reject_unstorable(value)


# What an operator sets on a queue (besides its id, on creation), through the API and the CLI
# alike (tasks/management/commands/scheduler.py): one list, so that they cannot disagree.
SCHEDULER_SETTABLE = (
    "kind",
    "description",
    "handler",
    "celery_queue",
    "max_queue_size",
    "dispatch_threshold",
    "lease_seconds",
    "retry_policy",
    "max_attempts",
    "retry_delay_seconds",
    "retry_max_delay_seconds",
    "retry_jitter",
    "dead_letter",
    "policy_weights",
    "rate_limit",
    "concurrency_key",
    "concurrency_limit",
    "fair_key",
)


# The schema of what Scheduler.clean() accepts (which the services run on every write).
@extend_schema_field(
    {
        "type": "object",
        "minProperties": 1,
        "properties": {name: {"type": "integer", "minimum": 0} for name in POLICIES},
        "additionalProperties": False,
        "description": "Share of the orchestrator's room per policy; at least one above 0.",
    }
)
class PolicyWeightsField(serializers.JSONField):
    """A JSON object of policy name to weight; the rules are Scheduler.clean()'s."""


class SchedulerSerializer(StrictTypes, serializers.ModelSerializer):
    counts = serializers.SerializerMethodField(help_text="Tasks per status.")
    policy_weights = PolicyWeightsField(required=False)

    class Meta:
        model = Scheduler
        fields = ["id", *SCHEDULER_SETTABLE, "paused", "counts", "created_at", "modified_at"]
        read_only_fields = ["paused", "created_at", "modified_at"]

    def get_counts(self, scheduler: Scheduler) -> dict[str, int]:
        counts = self.context.get("counts", {})
        return counts.get(scheduler.id, dict.fromkeys(TaskStatus.values, 0))

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["id"].read_only = True  # a queue is renamed by creating another
        return fields

    # Cross-field rules (celery needs a handler, backoff cap ≥ delay, policy weights) live in
    # Scheduler.clean(), which the services run, so the API, admin and CLI share them.


class SchedulerUpdateSerializer(SchedulerSerializer):
    """What a PATCH may change: all but the id."""

    class Meta(SchedulerSerializer.Meta):
        read_only_fields = [*SchedulerSerializer.Meta.read_only_fields, "id"]


class TaskSerializer(serializers.ModelSerializer):
    always_show_lease_token = False
    # The push's W3C trace context (null unless tracing is on): a runner that continues it
    # puts its run and reports into the task's trace (README, "Tracing").
    traceparent = serializers.CharField(source="trace_context", read_only=True, allow_null=True)

    class Meta:
        model = Task
        fields = [
            "id",
            "scheduler",
            "schedule",
            "status",
            "priority",
            "hash",
            "data",
            "result",
            "error",
            "traceback",
            "attempts",
            "not_before",
            "expires_at",
            "lease_expires_at",
            "worker",
            "cancel_requested_at",
            "lease_token",
            "traceparent",
            "created_at",
            "modified_at",
        ]
        read_only_fields = fields

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # The lease token proves who holds the task: only its holder (the pop's answer) and
        # operators see it.
        if not (self.always_show_lease_token or self.context.get("show_lease_token")):
            fields.pop("lease_token")
        return fields


class PoppedTaskSerializer(TaskSerializer):
    """A task as its new holder gets it from a pop: with its lease token."""

    always_show_lease_token = True


class AwareDateTimeField(serializers.DateTimeField):
    """A date-time that names its UTC offset: a naive one would be read in the server's time
    zone, and an expiry off by hours is worse than a 400."""

    default_error_messages = {
        "naive": "Must name its time zone (an offset such as +01:00, or Z for UTC)."
    }

    def enforce_timezone(self, value: datetime) -> datetime:
        if timezone.is_naive(value):
            self.fail("naive")
        return super().enforce_timezone(value)


def _when(value: datetime | None, zone: Any) -> str | None:
    """A date-time as DRF's DateTimeField renders it: in the current time zone, ISO 8601, UTC
    as Z."""
    if value is None:
        return None
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _task_payload(task: Task, zone: Any, show_lease_token: bool) -> dict[str, Any]:
    payload = {
        "id": str(task.id),
        "scheduler": task.scheduler_id,
        "schedule": None if task.schedule_id is None else str(task.schedule_id),
        "status": str(task.status),
        "priority": task.priority,
        "hash": task.hash,
        "data": task.data,
        "result": task.result,
        "error": task.error,
        "traceback": task.traceback,
        "attempts": task.attempts,
        "not_before": _when(task.not_before, zone),
        "expires_at": _when(task.expires_at, zone),
        "lease_expires_at": _when(task.lease_expires_at, zone),
        "worker": task.worker,
        "cancel_requested_at": _when(task.cancel_requested_at, zone),
        "lease_token": task.lease_token,
        "traceparent": task.trace_context,
        "created_at": _when(task.created_at, zone),
        "modified_at": _when(task.modified_at, zone),
    }
    if not show_lease_token:
        del payload["lease_token"]
    return payload


def render_tasks(
    tasks: Iterable[Task], *, popped: bool = False, show_lease_token: bool = False
) -> list[dict[str, Any]]:
    """Tasks as the API answers with them: what TaskSerializer (PoppedTaskSerializer when
    `popped`) renders, field for field and in its order (tests/tasks/test_api_render.py holds
    the two together), written out by hand. DRF's generic rendering (a lookup, a None check
    and a to_representation call per field, the time zone looked up per date-time) took a
    third of a pop request's CPU beyond the service call; the schema stays TaskSerializer's."""
    zone = timezone.get_current_timezone()
    shown = popped or show_lease_token
    return [_task_payload(task, zone, shown) for task in tasks]


class TaskPushSerializer(StrictTypes):
    data = JSONObjectField(required=False, default=dict)
    priority = serializers.IntegerField(
        required=False, default=0, min_value=-(2**31), max_value=2**31 - 1
    )
    hash = serializers.CharField(
        required=False,
        allow_null=True,
        max_length=64,
        default=None,
        validators=[reject_unstorable],
    )
    not_before = serializers.DateTimeField(required=False, allow_null=True, default=None)
    expires_at = AwareDateTimeField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Not handed out by then, the task never runs: it ends EXPIRED. ISO 8601 with "
        "its UTC offset (e.g. 2026-12-01T18:00:00Z).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        expires_at = attrs.get("expires_at")
        if expires_at is not None:
            if expires_at <= timezone.now():
                raise serializers.ValidationError(
                    {"expires_at": "Must be in the future: the task would expire unrun."}
                )
            not_before = attrs.get("not_before")
            if not_before is not None and expires_at <= not_before:
                raise serializers.ValidationError(
                    {"expires_at": "Must be after not_before: the task could never run."}
                )
        return attrs


_PUSH_FIELDS = frozenset(("data", "priority", "hash"))  # the others' checks: the serializer's


def _push_fast(data: Any) -> dict[str, Any] | None:
    """TaskPushSerializer's answer for a plain push (data, priority, hash; no datetimes), or
    None: see _report_fast."""
    if type(data) is not dict or not data.keys() <= _PUSH_FIELDS:
        return None
    task_data, priority, hash = data.get("data", {}), data.get("priority", 0), data.get("hash")
    if type(task_data) is not dict or not _plain_json(task_data):
        return None
    if type(priority) is not int or not -(2**31) <= priority <= 2**31 - 1:
        return None
    if hash is not None and (not _plain_text(hash, (1, 64)) or hash != hash.strip()):
        return None  # a hash with spaces around it is trimmed: left to the serializer
    return {
        "data": task_data if "data" in data else {},
        "priority": priority,
        "hash": hash,
        "not_before": None,
        "expires_at": None,
    }


def push_body(data: Any) -> tuple[Any, Any]:
    """TaskPushSerializer's (validated data, None) or (None, field errors) of one push
    (api_input.body_errors), a plain push checked without DRF's field-by-field validation."""
    validated = _push_fast(data)
    return (validated, None) if validated is not None else body_errors(TaskPushSerializer, data)


_SCALAR_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
MAX_POP_FILTERS = 10


# The schema of what validate_filters accepts, but the keys' pattern (OpenAPI 3.0 cannot
# state it; the help text does).
@extend_schema_field(
    {
        "type": "object",
        "maxProperties": MAX_POP_FILTERS,
        "additionalProperties": {
            "anyOf": [_SCALAR_SCHEMA, {"type": "array", "minItems": 1, "items": _SCALAR_SCHEMA}]
        },
    }
)
class PopFiltersField(serializers.DictField):
    child = serializers.JSONField()


class PopSerializer(StrictTypes):
    validation_is_pure = True  # the body alone decides (scheduler_site.api_input.body_errors)

    limit = serializers.IntegerField(
        required=False, default=1, min_value=1, max_value=settings.TASK_POP_MAX_LIMIT
    )
    wait = serializers.FloatField(
        required=False,
        default=0,
        min_value=0,
        max_value=settings.TASK_POP_MAX_WAIT_SECONDS,
        help_text="Seconds to wait for work when nothing is due: the answer comes as soon as a "
        "task is due, or empty after `wait` (long poll).",
    )
    filters = PopFiltersField(
        required=False,
        default=dict,
        help_text='Equality on keys of data, dotted for nesting: {"org": "acme", "boefje.id": '
        f'"dns"}}; a list means one of. At most {MAX_POP_FILTERS}; a key is up to 5 '
        "dot-separated parts of letters, digits, '_' and '-'.",
    )

    def validate_filters(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_POP_FILTERS:
            raise serializers.ValidationError(f"At most {MAX_POP_FILTERS} filters.")
        for key, wanted in value.items():
            if not _FILTER_KEY.match(key):
                raise serializers.ValidationError(
                    f"{key!r}: keys are letters, digits, '_' or '-', dotted for nesting."
                )
            values = wanted if isinstance(wanted, list) else [wanted]
            if not values or not all(isinstance(v, _SCALAR) for v in values):
                raise serializers.ValidationError(
                    f"{key!r}: the value must be a string, number, boolean or a non-empty list "
                    "of them."
                )
        return reject_unstorable(value)


class TaskReportSerializer(StrictTypes):
    patch_is_partial = False  # a complete report, sent with PATCH (scheduler_site.schema)

    status = serializers.ChoiceField(
        choices=[TaskStatus.RUNNING, TaskStatus.COMPLETED, TaskStatus.FAILED]
    )
    result = serializers.JSONField(
        required=False, allow_null=True, default=None, validators=[reject_unstorable]
    )
    error = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=10000,
        validators=[reject_unstorable],
    )
    traceback = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=64000,
        trim_whitespace=False,
        validators=[reject_unstorable],
        help_text="With FAILED: the failure's full traceback or log tail (error is its one-line "
        "summary).",
    )
    attempt = serializers.IntegerField(
        required=False,
        min_value=1,
        help_text="The attempt this runner holds (from pop); refused with 409 if it moved on.",
    )
    lease_token = serializers.CharField(
        required=False,
        max_length=64,
        trim_whitespace=False,
        validators=[reject_unstorable],
        help_text="The lease token your pop returned; required from runners (409 if it is not "
        "the task's current one). Operators may omit it: an override, noted in the event.",
    )


# The report body a runner sends with every task, checked without DRF's field-by-field
# validation (a profile of the PATCH put it at 0.6 ms of a 5 ms request, more than the
# report's own statement): a body this accepts is one TaskReportSerializer accepts, and the
# answer is the one it gives (tests/tasks/test_api_render.py compares them); anything else,
# an unknown field or a wrong type included, goes to the serializer for its exact errors.
# name: (shortest, longest); a blank lease_token is refused, a blank error or traceback not
_REPORT_TEXT = {"error": (0, 10000), "traceback": (0, 64000), "lease_token": (1, 64)}


def _plain_json(value: Any) -> bool:
    """A JSON value (as a JSON parser builds it) that the database can hold (`unstorable`)."""
    kind = type(value)
    if kind is str:
        return NUL_OR_SURROGATE.search(value) is None
    if kind is dict:
        return all(type(k) is str and _plain_json(k) and _plain_json(v) for k, v in value.items())
    if kind is list:
        return all(_plain_json(item) for item in value)
    if kind is float:
        return math.isfinite(value)  # `1e400` parses to inf: the serializer refuses it
    return value is None or kind is int or kind is bool


def _plain_text(value: Any, bounds: tuple[int, int]) -> bool:
    return (
        type(value) is str
        and bounds[0] <= len(value) <= bounds[1]
        and NUL_OR_SURROGATE.search(value) is None
    )


def _report_fast(data: Any) -> dict[str, Any] | None:
    if type(data) is not dict or not data.keys() <= _REPORT_FIELDS.keys():
        return None
    status = _REPORT_STATUSES.get(data.get("status")) if type(data.get("status")) is str else None
    attempt = data.get("attempt", 1)
    if status is None or type(attempt) is not int or attempt < 1:
        return None
    for name, bounds in _REPORT_TEXT.items():
        if name in data and not _plain_text(data[name], bounds):
            return None
    if not _plain_json(data.get("result")):
        return None
    # error is trimmed (CharField's trim_whitespace); traceback and lease_token are not
    validated = {**data, "status": status, "error": data.get("error", "").strip()}
    validated.setdefault("result", None)
    validated.setdefault("traceback", "")
    return validated


_REPORT_FIELDS = TaskReportSerializer._declared_fields
_REPORT_STATUSES = _REPORT_FIELDS["status"].choice_strings_to_values


def report_body(data: Any) -> dict[str, Any]:
    """TaskReportSerializer's validated data of a PATCH report's body (a copy, the caller's
    to change), or its ValidationError."""
    validated = _report_fast(data)
    return validated if validated is not None else dict(validated_body(TaskReportSerializer, data))


class BatchReportItemSerializer(TaskReportSerializer):
    id = serializers.UUIDField()


class BatchReportSerializer(StrictTypes):
    reports = serializers.ListField(
        child=BatchReportItemSerializer(), min_length=1, max_length=BATCH_MAX
    )


class PushOutcomeSerializer(serializers.Serializer):
    """One item of a batch push's answer: 201 with the task, 409 with the id of the active
    task that holds the hash, 429 (queue full) or 400 with the item's field errors."""

    status = serializers.IntegerField()
    task = TaskSerializer(required=False)
    existing_id = serializers.UUIDField(required=False)
    errors = serializers.DictField(required=False)


class ReportOutcomeSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.IntegerField()
    task = TaskSerializer(required=False)
    detail = serializers.CharField(required=False)


class HeartbeatSerializer(StrictTypes):
    attempt = serializers.IntegerField(required=False, min_value=1)
    lease_token = serializers.CharField(
        required=False,
        max_length=64,
        trim_whitespace=False,
        validators=[reject_unstorable],
        help_text="The lease token your pop returned; required from runners (409 if it is not "
        "the task's current one). Operators may omit it: an override, noted in the event.",
    )
    lease_seconds = serializers.IntegerField(required=False, min_value=1, max_value=86400)


class ReleaseSerializer(StrictTypes):
    DEFAULT_REASON = "released by its runner"

    attempt = serializers.IntegerField(required=False, min_value=1)
    lease_token = serializers.CharField(
        required=False,
        max_length=64,
        trim_whitespace=False,
        validators=[reject_unstorable],
        help_text="The lease token your pop returned; required from runners (409 if it is not "
        "the task's current one). Operators may omit it: an override, noted in the event.",
    )
    # Blank (or only whitespace, which is trimmed) means "no reason given", not a bad request:
    # the schema cannot say "not only whitespace", and a runner stopping should not be refused.
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        default=DEFAULT_REASON,
        max_length=500,
        validators=[reject_unstorable],
    )

    def validate_reason(self, value: str) -> str:
        return value or self.DEFAULT_REASON


class TaskEventSerializer(serializers.ModelSerializer):
    trace_id = serializers.SerializerMethodField(
        help_text='The OpenTelemetry trace of the task\'s work ("" when tracing is off).'
    )

    class Meta:
        model = TaskEvent
        fields = ["id", "from_status", "to_status", "at", "actor", "note", "trace_id"]

    def get_trace_id(self, event: TaskEvent) -> str:
        return tracing.trace_id_of(event.task.trace_context)


class StatsQuerySerializer(QuerySerializer):
    # source: the selector takes scheduler_id.
    scheduler = serializers.CharField(
        required=False, max_length=64, source="scheduler_id", trim_whitespace=False
    )
    hours = serializers.IntegerField(required=False, default=24, min_value=1, max_value=24 * 31)


class SeriesQuerySerializer(QuerySerializer):
    range = serializers.ChoiceField(
        choices=list(selectors.RANGES),
        required=False,
        default="1h",
        source="range_name",
        help_text="1h (a point per minute), 24h (per 15 minutes) or 7d (per hour).",
    )
    scheduler = serializers.CharField(
        required=False, max_length=64, source="scheduler_id", trim_whitespace=False
    )


class SeriesSerializer(serializers.Serializer):
    range = serializers.CharField()
    step_seconds = serializers.IntegerField()
    t = serializers.ListField(child=serializers.IntegerField(), help_text="Unix seconds.")
    started = serializers.ListField(child=serializers.IntegerField())
    completed = serializers.ListField(child=serializers.IntegerField())
    failed_attempts = serializers.ListField(child=serializers.IntegerField())
    failed = serializers.ListField(child=serializers.IntegerField())
    dead = serializers.ListField(child=serializers.IntegerField())
    wait_p50 = serializers.ListField(child=serializers.FloatField(allow_null=True))
    wait_p95 = serializers.ListField(child=serializers.FloatField(allow_null=True))


class StatsRowSerializer(serializers.Serializer):
    hour = serializers.DateTimeField()
    scheduler = serializers.CharField()
    status = serializers.CharField()
    count = serializers.IntegerField()


class WorkerSerializer(serializers.ModelSerializer):
    state = serializers.SerializerMethodField(
        help_text="live, stopped (shut down cleanly) or lost (not seen lately)."
    )

    class Meta:
        model = Worker
        fields = [
            "name",
            "kind",
            "host",
            "pid",
            "queues",
            "account",
            "state",
            "started_at",
            "last_seen_at",
            "stopped_at",
            "tasks_held",
        ]
        read_only_fields = fields

    def get_state(self, worker: Worker) -> str:
        return selectors.worker_state(worker)
