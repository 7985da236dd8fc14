"""Domain errors of the queue services. The API maps each to one HTTP status."""

from __future__ import annotations

import uuid


class QueueError(Exception):
    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def payload(self) -> dict[str, object]:
        return {"detail": self.message}


class SchedulerNotFound(QueueError):
    http_status = 404


class TaskNotFound(QueueError):
    http_status = 404


class DuplicateTask(QueueError):
    http_status = 409

    def __init__(self, message: str, *, existing_id: uuid.UUID) -> None:
        super().__init__(message)
        self.existing_id = existing_id

    def payload(self) -> dict[str, object]:
        return {"detail": self.message, "existing_id": str(self.existing_id)}


class QueueFull(QueueError):
    http_status = 429


class TransitionRefused(QueueError):
    http_status = 409

    def __init__(self, message: str, *, current_status: str) -> None:
        super().__init__(message)
        self.current_status = current_status

    def payload(self) -> dict[str, object]:
        return {"detail": self.message, "status": self.current_status}


class InvalidRequest(QueueError):
    """Bad input found by a service (not by a serializer); names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def payload(self) -> dict[str, object]:
        return {self.field: [self.message.removeprefix(f"{self.field}: ")]}
