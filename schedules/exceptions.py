from __future__ import annotations

from tasks.exceptions import QueueError


class ScheduleNotFound(QueueError):
    http_status = 404


class ScheduleStateError(QueueError):
    http_status = 409
