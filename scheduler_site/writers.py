"""The services behind the models' state-machine methods (`Task.complete()`,
`Schedule.pause()`, `ComputeElement.drain()`, …).

A model cannot import the services that import it, so each app registers its writers here in
its AppConfig.ready(), and the models' methods call them by name: the methods stay thin (no
SQL in models), and every change still goes through the one writer of that app (CAS plus its
event row). A check a model's clean() needs from a layer above it (Scheduler.clean() asks
tasks.registry whether its handler exists) is registered the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured

_WRITERS: dict[str, Callable[..., Any]] = {}


def register(**writers: Callable[..., Any]) -> None:
    _WRITERS.update(writers)


def call(writer_name: str, /, **kwargs: Any) -> Any:
    try:
        writer = _WRITERS[writer_name]
    except KeyError:
        raise ImproperlyConfigured(
            f"no writer {writer_name!r} registered: is its app in INSTALLED_APPS and ready?"
        ) from None
    return writer(**kwargs)
