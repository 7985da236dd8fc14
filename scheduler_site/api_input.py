"""Input of the API, strict: a value of the wrong type or shape is a 400 naming it.

Query parameters: DRF's paginators replace a limit, offset or page size they cannot read with
their default, and django-filter and DRF serializers take a parameter given empty
(`?created_after=`) as not given: a script that builds `?created_after=$SINCE` with SINCE unset
would list everything. Here each is refused instead, and the schema states the bounds.

JSON bodies: DRF coerces scalars (`"7"` or `7.0` for 7, `0` for false, `5` for "5") and takes
any iterable for a list (`{"lhcb": 1}` as `["lhcb"]`). StrictTypes refuses what is not the
JSON type the schema states.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django_filters import utils as filter_utils
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import negotiation, pagination, parsers, serializers
from rest_framework.exceptions import ErrorDetail, NotFound, ParseError, ValidationError
from rest_framework.request import Request
from rest_framework.settings import api_settings

_DIGITS = re.compile(r"[0-9]{1,10}")
MAX_OFFSET = 2**31 - 1
EMPTY_MESSAGE = "Must not be empty; leave the parameter out instead."
MAX_JSON_DEPTH = 64
TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels."


def json_depth(value: Any, *, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply objects and lists nest in `value` (a scalar 0, `{}` 1, `{"a": []}` 2),
    counted without recursion; stops counting once past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing a body nested deeper than MAX_JSON_DEPTH. Python's decoder
    recurses: about 950 levels raised RecursionError, a 500. Deep but decodable bodies are
    refused too, so that no serializer, JSON field or database ever sees one."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ParseError(TOO_DEEP)
        return data


class ContentNegotiation(negotiation.DefaultContentNegotiation):
    """DRF's negotiation, with what nearly every client sends answered at once: no `format`
    and an Accept of JSON or anything (runners, curl, requests) get the JSON renderer with
    the media type DRF's own matching gives them (`application/json`). DRF parses the header
    and matches each renderer against each type on every request: a tenth of the API's own
    CPU on a pop. Anything else (a browser's Accept, ?format=) goes through DRF's matching."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        accept = request.META.get("HTTP_ACCEPT", "*/*")
        if (
            accept in ("*/*", "application/json")
            and not format_suffix
            and renderers
            and renderers[0].media_type == "application/json"
            and self.settings.URL_FORMAT_OVERRIDE not in request.query_params
        ):
            return renderers[0], "application/json"
        return super().select_renderer(request, renderers, format_suffix)


def query_int(
    request: Request, name: str, *, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = int(raw) if _DIGITS.fullmatch(raw) else None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"≥ {minimum}"
        raise ValidationError({name: [f"Must be an integer {bounds}."]})
    return value


def _with_bounds(
    parameters: list[dict[str, Any]], bounds: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    for parameter in parameters:
        if parameter["name"] in bounds:
            parameter["schema"] = {**parameter["schema"], **bounds[parameter["name"]]}
    return parameters


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = 1000

    def get_limit(self, request: Request) -> int:
        return query_int(
            request,
            self.limit_query_param,
            default=self.default_limit,
            minimum=1,
            maximum=self.max_limit,
        )

    def get_offset(self, request: Request) -> int:
        return query_int(request, self.offset_query_param, default=0, minimum=0, maximum=MAX_OFFSET)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return _with_bounds(
            super().get_schema_operation_parameters(view),
            {
                self.limit_query_param: {"minimum": 1, "maximum": self.max_limit},
                self.offset_query_param: {"minimum": 0, "maximum": MAX_OFFSET},
            },
        )


class CursorPagination(pagination.CursorPagination):
    """Cursor paging (no COUNT(*)); an unreadable cursor stays DRF's 404 "Invalid cursor"."""

    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def paginate_queryset(self, queryset: QuerySet, request: Request, view: Any = None) -> Any:
        try:
            return super().paginate_queryset(queryset, request, view)
        except DjangoValidationError:
            # A cursor that decodes, but to a position the ordering field cannot hold.
            raise NotFound(self.invalid_cursor_message) from None

    def get_page_size(self, request: Request) -> int:
        return query_int(
            request,
            self.page_size_query_param,
            default=self.page_size,
            minimum=1,
            maximum=self.max_page_size,
        )

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return _with_bounds(
            super().get_schema_operation_parameters(view),
            {self.page_size_query_param: {"minimum": 1, "maximum": self.max_page_size}},
        )


def refuse_empty(query: Any, names: Any) -> None:
    """400 for each of `names` given in the query string with an empty value."""
    empty = sorted(name for name in names if name in query and "" in query.getlist(name))
    if empty:
        raise ValidationError({name: [EMPTY_MESSAGE] for name in empty})


def refuse_unknown(query: Any, known: Any) -> None:
    """400 naming each parameter of the query string that is not in `known`: ignored, it
    would silently widen the answer (`/api/tasks/?scheduler_id=x` listed every task)."""
    # `format` is DRF's content negotiation's (URL_FORMAT_OVERRIDE), known on every endpoint.
    unknown = sorted(set(query) - set(known) - {api_settings.URL_FORMAT_OVERRIDE})
    if unknown:
        listed = ", ".join(sorted(known)) or "none but format"
        message = f"Unknown parameter; known here: {listed}."
        raise ValidationError({name: [message] for name in unknown})


def paging_parameters(paginator: Any) -> set[str]:
    """The query parameters of a paginator, whichever scheme it pages with."""
    names = ("limit_query_param", "offset_query_param", "cursor_query_param")
    names += ("page_size_query_param", "page_query_param")
    return {getattr(paginator, name) for name in names if getattr(paginator, name, None)}


class FilterBackend(DjangoFilterBackend):
    """django-filter's backend; a parameter that is neither a filter nor the view's paging is
    refused, a filter given empty is refused rather than ignored, and a time is compared in
    UTC (PostgreSQL refuses offsets beyond ±15:59, which ISO 8601 allows).

    Every list, and every detail through get_object(), passes here, even without a filterset.
    """

    def filter_queryset(self, request: Request, queryset: QuerySet, view: Any) -> QuerySet:
        filterset = self.get_filterset(request, queryset, view)
        filters = filterset.filters if filterset is not None else {}
        paging = paging_parameters(view.paginator) if view.paginator is not None else set()
        refuse_unknown(request.query_params, {*filters, *paging})
        if filterset is None:
            return queryset
        refuse_empty(request.query_params, filterset.filters)
        if not filterset.is_valid():
            raise filter_utils.translate_validation(filterset.errors)
        cleaned = filterset.form.cleaned_data
        for name, value in cleaned.items():
            if isinstance(value, datetime) and value.tzinfo is not None:
                try:
                    cleaned[name] = value.astimezone(UTC)
                except OverflowError:
                    raise ValidationError({name: ["Out of range."]}) from None
        return filterset.qs


class QuerySerializer(serializers.Serializer):
    """A serializer of query parameters; a parameter given empty or unknown is refused, not
    ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if hasattr(data, "getlist"):
            refuse_unknown(data, self.fields)
            refuse_empty(data, self.fields)
        return super().to_internal_value(data)


def _wrong_type(field: serializers.Field, value: Any) -> str | None:
    if value is None:
        return None  # allow_null is the field's own business
    if isinstance(
        field,
        serializers.ListField | serializers.ManyRelatedField | serializers.MultipleChoiceField,
    ):
        return None if isinstance(value, list) else "Must be a list."
    if isinstance(field, serializers.BooleanField):
        return None if isinstance(value, bool) else "Must be true or false."
    if isinstance(field, serializers.IntegerField):
        return (
            None
            if isinstance(value, int) and not isinstance(value, bool)
            else "Must be an integer."
        )
    if isinstance(field, serializers.FloatField | serializers.DecimalField):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "Must be a number."
    string_fields = (
        serializers.CharField,
        serializers.ChoiceField,
        serializers.DateTimeField,
        serializers.UUIDField,
        serializers.SlugRelatedField,
    )
    if isinstance(field, string_fields):
        return None if isinstance(value, str) else "Must be a string."
    return None


UNKNOWN_FIELD = "Unknown field."
READ_ONLY_FIELD = "Read-only: it cannot be set here."


def _field_problems(serializer: serializers.Serializer, data: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a body that are not fields it may set. DRF drops them silently, so that
    `PATCH {"enabled": false}` on a schedule answered 200 and changed nothing."""
    problems: dict[str, Any] = {}
    for name in data:
        field = serializer.fields.get(name)
        if field is None:
            problems[name] = [UNKNOWN_FIELD]
        elif field.read_only:
            problems[name] = [READ_ONLY_FIELD]
    return problems


class StrictTypes(serializers.Serializer):
    """The base of every request serializer: refuses a field it does not know or may not set,
    and a JSON value whose type is not the field's, before DRF would coerce it."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            if problems := _field_problems(self, data):
                raise ValidationError(problems)
            errors = {
                name: [message]
                for name, field in self.fields.items()
                if not field.read_only
                and name in data
                and (message := _wrong_type(field, data[name])) is not None
            }
            if errors:
                raise ValidationError(errors)
        return super().to_internal_value(data)


@functools.cache
def _validator(cls: type[serializers.Serializer]) -> serializers.Serializer:
    return cls()


# Valid bodies of the serializers whose validation reads the body alone (a class attribute
# `validation_is_pure = True`: no clock, no database, no context), by the body: a runner sends
# the same pop body thousands of times, and DRF's field-by-field validation of it cost as much
# as the answer's rendering. Bounded; only small flat bodies of JSON scalars are keys.
_VALID_BODIES: dict[tuple[Any, ...], Any] = {}
_VALID_BODIES_MAX = 256
_SCALARS = (str, int, float, bool, type(None))


def _body_key(cls: type[serializers.Serializer], data: Any) -> tuple[Any, ...] | None:
    if not getattr(cls, "validation_is_pure", False) or type(data) is not dict or len(data) > 4:
        return None
    # With each value's type: 1, 1.0 and true are equal in Python, not as input (a `true`
    # limit is refused).
    items = tuple((key, type(value), value) for key, value in data.items())
    return (cls, *items) if all(item[1] in _SCALARS for item in items) else None


def body_errors(cls: type[serializers.Serializer], data: Any) -> tuple[Any, Any]:
    """(validated data, None) or (None, field errors): what `cls(data=data).is_valid()` then
    `.validated_data` / `.errors` give, through one instance of `cls` per process. DRF
    deep-copies a serializer's declared fields on every instantiation, which cost more than
    the validation itself (a batch push of 1,000 items made 1,000 copies). Only for the request
    serializers of this project: their validation reads no context, instance or initial_data,
    and writes nothing on the instance, so threads may share it. A pure serializer's valid
    answer is remembered by body (_VALID_BODIES); errors are worked out afresh each time."""
    key = _body_key(cls, data)
    if key is not None and (known := _VALID_BODIES.get(key)) is not None:
        return copy.deepcopy(known), None  # the caller's to change
    try:
        validated = _validator(cls).run_validation(data)
    except ValidationError as exc:
        detail = exc.detail
    else:
        if key is not None:
            if len(_VALID_BODIES) >= _VALID_BODIES_MAX:
                _VALID_BODIES.clear()
            _VALID_BODIES[key] = copy.deepcopy(validated)
        return validated, None
    if isinstance(detail, list) and len(detail) == 1 and getattr(detail[0], "code", "") == "null":
        # Serializer.errors' own edge case: a body of `null`.
        detail = {api_settings.NON_FIELD_ERRORS_KEY: [ErrorDetail("No data provided", "null")]}
    return None, detail


def validated_body(cls: type[serializers.Serializer], data: Any) -> Any:
    """`cls(data=data).is_valid(raise_exception=True)` then `.validated_data` (body_errors)."""
    validated, errors = body_errors(cls, data)
    if errors is not None:
        raise ValidationError(errors)
    return validated


NO_BODY = "Unknown field: this action takes no body."


class StrictBodyMixin:
    """For viewsets: an action declared `@action(..., takes_body=False)` refuses a body, as
    an unknown field would be elsewhere, rather than ignore it (a `{"reason": ...}` sent to
    cancel/ was never recorded). DRF hands an action's kwargs to the view as attributes."""

    takes_body = True

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        if self.takes_body:
            return
        data = request.data  # parsed: not JSON is 415, too deep 400, as everywhere
        if isinstance(data, Mapping) and data:
            raise ValidationError({name: [NO_BODY] for name in data})
        if not isinstance(data, Mapping) and data is not None:
            raise ParseError("This action takes no body.")
