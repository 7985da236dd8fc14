"""Flow-control settings of a scheduler, as plain values (DESIGN §9.4): the rate limit's
notation and the data keys of concurrency limits and fair share. No database here: the model
validates with these, stamps a task's key values at insert, and tasks.flow applies them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from django.core.validators import RegexValidator

RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE = re.compile(r"^([1-9][0-9]{0,8})/([smh])$")
# Like the pop filters' keys: up to five dotted parts of letters, digits, '_' and '-'.
DATA_KEY = r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,4}$"
# Longer values are stored as their digest: the column is indexed, and two long values that
# share a prefix must not be taken for one.
VALUE_MAX = 255

rate_limit_validator = RegexValidator(
    _RATE.pattern, 'Use Celery\'s notation: a count per s, m or h, e.g. "100/s", "600/m".'
)
data_key_validator = RegexValidator(
    DATA_KEY, "A key of the task's data; dots reach into objects (e.g. org.id)."
)


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: int

    @property
    def window_us(self) -> int:
        return self.seconds * 1_000_000


def parse_rate(text: str) -> Rate | None:
    """`"100/s"` → Rate(100, 1); `""` → None (no limit). Raises ValueError on anything else."""
    if not text:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a rate limit: {text!r}")
    return Rate(int(match.group(1)), RATE_UNITS[match.group(2)])


def key_value(data: Any, dotted: str) -> str | None:
    """The value of `data` at a dotted key, as the text the index holds; None when absent.
    Strings are themselves, anything else its JSON (so 7 and "7" are one value each)."""
    value = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > VALUE_MAX:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text
