"""The registry of Compute Element backends: each one registers once, by name, with how to
build it and which `backend_settings` options it reads. The model's choices, the settings
validation and `backend_for` all come from here, so a new backend cannot be half known (run as
another one, or accept any settings).

This module imports no model: pilots.models reads it for the field's choices and validation,
and pilots.backends (which imports the models) registers the backends into it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

DEFAULT_BACKEND = "simulated"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    label: str
    factory: Callable[[Any], Any]  # ComputeElement -> a PilotBackend
    options: frozenset[str] = frozenset()
    number_options: frozenset[str] = frozenset()  # seconds, 0 or more
    check: Callable[[dict[str, Any]], str | None] | None = None  # a further rule's problem


BACKENDS: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    if not spec.number_options <= spec.options:
        raise ValueError(f"backend {spec.name}: number options must be options too")
    BACKENDS[spec.name] = spec
    return spec


def choices() -> list[tuple[str, str]]:
    """The model field's choices (a callable, so registration order does not matter)."""
    return [(spec.name, spec.label) for spec in BACKENDS.values()]


def spec_for(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS)) or "none"
        message = f"{name!r} is not a backend (known: {known})."
        raise ValidationError({"backend": [message]}) from None


def _seconds(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an integer too large for a float
        return False


def check_settings(backend: str, options: Any) -> None:
    """Refuse backend_settings the backend could not use (at input, not at the first submit):
    any option it does not read (a misspelt one, or a command line smuggled in under another
    name, is never silently ignored), and any its own rule refuses."""
    spec = spec_for(backend)
    if not isinstance(options, dict):
        raise ValidationError({"backend_settings": ["Must be a JSON object."]})
    errors = [
        f"{key}: unknown option; the {backend} backend reads {sorted(spec.options)}."
        for key in sorted(set(options) - spec.options)
    ]
    errors += [
        f"{key}: must be a number of seconds, 0 or more."
        for key in sorted(spec.number_options)
        if key in options and not _seconds(options[key])
    ]
    if spec.check is not None and (problem := spec.check(options)):
        errors.append(problem)
    if errors:
        raise ValidationError({"backend_settings": errors})
