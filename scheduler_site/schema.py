"""The OpenAPI schema: drf-spectacular's, plus the error answers every operation really gives.

Views document their own specific errors (409 duplicate, 429 queue full, …); this adds the
ones that come from the framework, so that a client (and schemathesis) finds every status code
the API answers in the schema, each with the error body of scheduler_site.api_errors.
"""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from drf_spectacular import openapi
from rest_framework import serializers
from rest_framework.pagination import CursorPagination

from scheduler_site.api_input import StrictTypes


class ErrorSerializer(serializers.Serializer):
    """An error: `{"detail": "..."}` (plus `existing_id` on a duplicate, `status` on a refused
    transition), or field errors for bad input: `{"field": ["message", ...]}`."""

    detail = serializers.CharField(
        required=False, help_text="What went wrong (not found, refused transition, throttled, …)."
    )
    existing_id = serializers.UUIDField(
        required=False, help_text="On a duplicate (409): the id of the active task in the way."
    )

    class Meta:
        ref_name = "Error"


COMMON = {
    "401": "Not authenticated: no or an unknown token or session",
    "403": "Authenticated, but the account's role does not allow this",
    "429": "Throttled: too many requests (the Retry-After header says when to retry)",
}


# One character that str.strip() (DRF's trimming) keeps. Not `\S`: JSON Schema patterns are
# ECMA-262 regexes, whose whitespace differs from Python's (U+001C-U+001F, U+0085 are
# whitespace to Python only), so this names Python's whitespace, written alike in both.
NOT_ONLY_WHITESPACE = (
    r"[^\t\n\u000b\u000c\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029"
    r"\u202f\u205f\u3000]"
)


class AutoSchema(openapi.AutoSchema):
    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        responses = operation["responses"]
        parameters = operation.get("parameters", [])
        extra = dict(COMMON)
        if "requestBody" in operation:
            extra["400"] = "Bad input, each problem named"
            extra["415"] = "Unsupported media type: the API takes JSON only"
        elif any(parameter["in"] == "query" for parameter in parameters):
            extra["400"] = "Bad query parameter, each named"
        elif getattr(self.view, "takes_body", True) is False:
            extra["400"] = "A body was sent: this action takes none"
        if any(parameter["in"] == "path" for parameter in parameters):
            extra["404"] = "Not found"
        elif self._is_list_view() and isinstance(self._get_paginator(), CursorPagination):
            extra["404"] = "Invalid cursor"
        for code, what in extra.items():
            responses.setdefault(code, {"description": what})
        error = self.resolve_serializer(ErrorSerializer, "response").ref
        for code, response in responses.items():
            if code.startswith("4") and "content" not in response:
                response["content"] = {"application/json": {"schema": error}}
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def _map_serializer_field(
        self, field: Any, direction: str, bypass_extensions: bool = False
    ) -> dict[str, Any]:
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if (
            direction == "request"
            and isinstance(field, serializers.CharField)
            and field.trim_whitespace
            and not field.allow_blank
            and schema.get("type") == "string"
            and not {"pattern", "format", "enum"} & schema.keys()
            and not any(isinstance(v, RegexValidator) for v in field.validators)
        ):
            # DRF trims the value, then refuses it blank: " " has a minLength of 1 but is
            # refused. Say so: at least one character that is not whitespace. (A field with
            # a RegexValidator gets that pattern later, from drf-spectacular.)
            schema["pattern"] = NOT_ONLY_WHITESPACE
        return schema

    def _map_basic_serializer(self, serializer: Any, direction: str) -> dict[str, Any]:
        schema = super()._map_basic_serializer(serializer, direction)
        if direction == "request" and isinstance(serializer, StrictTypes):
            # A request serializer refuses a field it does not know (api_input.StrictTypes).
            schema["additionalProperties"] = False
        return schema

    def _unwrap_list_serializer(self, serializer: Any, direction: str) -> Any:
        schema = super()._unwrap_list_serializer(serializer, direction)
        if isinstance(serializer, serializers.ListSerializer) and schema:
            # A batch body says how many items it takes (push: 1 to 1,000 task objects).
            if serializer.min_length is not None:
                schema["minItems"] = serializer.min_length
            if serializer.max_length is not None:
                schema["maxItems"] = serializer.max_length
        return schema

    def _get_filter_parameters(self) -> list[dict[str, Any]]:
        # The filter backend refuses a filter given empty (scheduler_site.api_input).
        parameters = super()._get_filter_parameters()
        for parameter in parameters:
            schema = parameter.get("schema", {})
            if schema.get("type") == "string" and not {"format", "enum"} & schema.keys():
                schema.setdefault("minLength", 1)
        return parameters

    def _get_request_for_media_type(self, serializer: Any, direction: str = "request") -> Any:
        # A PATCH body is partial, unless its serializer says it is a complete command of its
        # own (`patch_is_partial = False`: a task's report, whose status is required).
        if self.method == "PATCH" and getattr(serializer, "patch_is_partial", True) is False:
            self.method = "POST"
            try:
                return super()._get_request_for_media_type(serializer, direction)
            finally:
                self.method = "PATCH"
        return super()._get_request_for_media_type(serializer, direction)
