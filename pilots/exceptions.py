"""The pilots app's refusals (each a QueueError, so the API's one error map renders them)."""

from __future__ import annotations

from tasks.exceptions import QueueError


class PilotNotFound(QueueError):
    http_status = 404


class NoFreeSlot(QueueError):
    http_status = 409
