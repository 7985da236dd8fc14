"""Mutexes as lease rows in the database (DiracX semantics); their SQL is in tasks.lock_sql.

`MutexLock("pilot", ce_name)` names a lock. Acquiring is one statement on both databases:
INSERT … ON CONFLICT DO UPDATE … WHERE the holder's lease expired, RETURNING the owner; so a
free or expired lock is taken atomically and a live one is never stolen. Locks are try-locks
(nobody waits in the database): a task whose lock is held goes back to the queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from tasks import lock_sql
from tasks.models import Lock


@dataclass(frozen=True, order=True)
class MutexLock:
    object_type: str
    keys: tuple[str, ...] = ()

    def __init__(self, object_type: str, *keys: object) -> None:
        object.__setattr__(self, "object_type", object_type)
        object.__setattr__(self, "keys", tuple(str(key) for key in keys))

    @property
    def name(self) -> str:
        return ":".join([self.object_type, *self.keys])[:255]


def acquire(locks: Iterable[MutexLock], *, owner: str, ttl: timedelta) -> list[str] | None:
    """Take every lock (in a fixed order) or none; the names taken, or None if one is held."""
    taken: list[str] = []
    for lock in sorted(set(locks)):
        with transaction.atomic():
            now = timezone.now()
            acquired = lock_sql.try_acquire(
                name=lock.name, owner=owner, now=now, expires_at=now + ttl
            )
        if not acquired:
            release(taken, owner=owner)
            return None
        taken.append(lock.name)
    return taken


def extend(names: Sequence[str], *, owner: str, ttl: timedelta) -> int:
    """Push the leases of our locks forward; the count still ours (fewer: one was taken over)."""
    if not names:
        return 0
    return Lock.objects.filter(name__in=list(names), owner=owner).update(
        expires_at=timezone.now() + ttl
    )


def release(names: Sequence[str], *, owner: str) -> None:
    if names:
        Lock.objects.filter(name__in=list(names), owner=owner).delete()


def holder(lock: MutexLock) -> Lock | None:
    return Lock.objects.filter(name=lock.name, expires_at__gte=timezone.now()).first()
