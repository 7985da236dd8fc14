"""What PostgreSQL's jsonb and text cannot hold (and SQLite's UTF-8 text cannot encode), checked
before a write so that the answer is a 4xx naming the field, on every path in (the API's
serializers, the admin's forms): a NUL, a lone UTF-16 surrogate (JSON's "\\ud800" parses to
one), and, in JSON, a non-finite number (`1e400` and the admin's `Infinity` parse to inf).
Left to the database they failed at the insert: a 500 on SQLite, an unnamed 400 on PostgreSQL."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from django import forms
from django.forms.fields import InvalidJSONInput

NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")
NUL_MESSAGE = "Must not contain the NUL character (\\u0000)."
SURROGATE_MESSAGE = "Must not contain a lone UTF-16 surrogate (\\ud800-\\udfff): it is not text."
NON_FINITE_MESSAGE = "Must not contain Infinity or NaN: JSON numbers are finite."


def _unstorable_text(text: str) -> str | None:
    found = NUL_OR_SURROGATE.search(text)
    if found is None:
        return None
    return NUL_MESSAGE if found.group() == "\x00" else SURROGATE_MESSAGE


def unstorable(value: Any) -> str | None:
    """Why `value` (text or a parsed JSON value) cannot be stored, or None."""
    if isinstance(value, str):
        return _unstorable_text(value)
    if isinstance(value, float):
        return None if math.isfinite(value) else NON_FINITE_MESSAGE
    if isinstance(value, dict):
        parts: Iterable[Any] = (part for item in value.items() for part in item)
    elif isinstance(value, list):
        parts = value
    else:
        return None
    return next((why for why in map(unstorable, parts) if why is not None), None)


class StorableJSONFormField(forms.JSONField):
    """The admin's JSON input (Django's form field parses `Infinity` and `NaN`, and keeps lone
    surrogates), refused as a form error when the database could not hold it."""

    def to_python(self, value: Any) -> Any:
        parsed = super().to_python(value)
        why = unstorable(parsed)
        if why is not None:
            raise forms.ValidationError(why, code="unstorable")
        return parsed

    def bound_data(self, data: Any, initial: Any) -> Any:
        # The form shown again with its error: the text as typed, not the parsed value, whose
        # lone surrogate the page could not encode.
        bound = super().bound_data(data, initial)
        if not isinstance(bound, InvalidJSONInput) and unstorable(bound) is not None:
            return InvalidJSONInput(data)
        return bound
