"""Mutexes and semaphores as lease rows in the database (DiracX semantics); their SQL is in
tasks.lock_sql.

`MutexLock("pilot", ce_name)` names a lock. Acquiring is one statement on both databases:
INSERT … ON CONFLICT DO UPDATE … WHERE the holder's lease expired, RETURNING the owner; so a
free or expired lock is taken atomically and a live one is never stolen. Locks are try-locks
(nobody waits in the database): a task whose lock is held goes back to the queue.

`Semaphore("ce", ce_name, limit=N)` is a lock N holders may hold at once: N slot rows, each a
mutex of its own (slot 0 is named like the MutexLock of the same type and keys, so a
MutexLock is the case N = 1), taken by the same statement, so the same takeover of expired
holders holds and there are never more than N live holders.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from tasks.models import Lock
from tasks.queue import locks as lock_sql


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


def _try_acquire(name: str, *, owner: str, ttl: timedelta) -> bool:
    now = timezone.now()
    return lock_sql.try_acquire(name=name, owner=owner, now=now, expires_at=now + ttl)


def acquire(
    locks: Iterable[MutexLock | Semaphore], *, owner: str, ttl: timedelta
) -> list[str] | None:
    """Take every lock (in a fixed order) or none; the names taken (a semaphore's: the slot
    it got), or None if one is held (a semaphore: all its slots)."""
    taken: list[str] = []
    for lock in sorted(set(locks), key=lambda lock: lock.name):
        if isinstance(lock, Semaphore):
            name = _acquire_slot(lock, owner=owner, ttl=ttl)
        else:
            with transaction.atomic():
                acquired = _try_acquire(lock.name, owner=owner, ttl=ttl)
            name = lock.name if acquired else None
        if name is None:
            release(taken, owner=owner)
            return None
        taken.append(name)
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


# --- semaphores (DESIGN 9.4) --------------------------------------------------------------------
#
# A semaphore of limit N is N slot rows in the lock table ("name", "name#1" … "name#N-1"),
# each taken by _try_acquire, so each slot has one live holder at most and the semaphore N.
# One read finds the live slots (and whether the owner holds one already: taking it again
# renews it, as a MutexLock does); the free or expired ones are then tried, from an offset
# that spreads owners over the slots, until one is won. A slot a concurrent owner won first
# just moves us to the next one.

SEMAPHORE_MAX_LIMIT = 1000


@dataclass(frozen=True)
class Semaphore:
    object_type: str
    keys: tuple[str, ...] = ()
    limit: int = 1

    def __init__(self, object_type: str, *keys: object, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"Semaphore limit must be a whole number, not {limit!r}")
        if not 1 <= limit <= SEMAPHORE_MAX_LIMIT:
            raise ValueError(f"Semaphore limit must be 1 to {SEMAPHORE_MAX_LIMIT}, not {limit}")
        object.__setattr__(self, "object_type", object_type)
        object.__setattr__(self, "keys", tuple(str(key) for key in keys))
        object.__setattr__(self, "limit", limit)

    @property
    def name(self) -> str:
        # Room for the slot suffix: "#999" at most.
        return ":".join([self.object_type, *self.keys])[:250]

    @property
    def slot_names(self) -> list[str]:
        return [self.name, *(f"{self.name}#{slot}" for slot in range(1, self.limit))]


def _live_slots(semaphore: Semaphore) -> dict[str, str]:
    """Slot name -> owner of the semaphore's slots held by a live lease now."""
    return lock_sql.live_owners(names=semaphore.slot_names, now=timezone.now())


def _acquire_slot(semaphore: Semaphore, *, owner: str, ttl: timedelta) -> str | None:
    """Take (or renew) one slot of `semaphore` for `owner`; its name, or None when all N are
    held by live leases of others."""
    live = _live_slots(semaphore)
    mine = [name for name, holder_ in live.items() if holder_ == owner]
    slots = semaphore.slot_names
    start = zlib.crc32(owner.encode()) % len(slots)
    for name in mine[:1] or [s for s in slots[start:] + slots[:start] if s not in live]:
        # A transaction per slot: PostgreSQL keeps the row lock of a conflicting INSERT … ON
        # CONFLICT even when its WHERE refuses the update, and owners try the slots in
        # different orders; holding one slot's lock while trying the next deadlocked.
        with transaction.atomic():
            if _try_acquire(name, owner=owner, ttl=ttl):
                return name
    return None


def holders(semaphore: Semaphore) -> list[Lock]:
    """The live holders of a semaphore's slots (at most its limit)."""
    now = timezone.now()
    return list(
        Lock.objects.filter(name__in=semaphore.slot_names, expires_at__gte=now).order_by("name")
    )
