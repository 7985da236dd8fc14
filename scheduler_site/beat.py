"""Highly available beat: run `celery beat` on every host; only the holder of a lease row in
the database sends.

`LeasedDatabaseScheduler` is django-celery-beat's DatabaseScheduler behind a lease: a row of
the lock table (tasks.locks, `INSERT … ON CONFLICT DO UPDATE … WHERE expires_at < now`: a
live lease is never stolen, an expired one is taken over atomically), renewed at every tick,
so on SQLite and PostgreSQL alike and with no Redis. A beat without the lease stands by and
tries again every third of a lease; when the holder dies, its lease runs out and another beat
takes it within about 1⅓ lease periods.

No double sends across a handover: before each send the holder renews its lease and writes
the job's `last_run_at` in one transaction (a fence: a beat whose lease was taken over sends
nothing), and a beat that takes the lease over reloads every job from the database first, so
it sends each job when it is next due after the last send, whoever made it. A beat killed in
the instant between recording a send and sending it loses that one send (at most once).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, close_old_connections, connection, transaction
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from tasks import locks

logger = logging.getLogger(__name__)

BEAT_LEASE = locks.MutexLock("celery-beat")


class LeasedDatabaseScheduler(DatabaseScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lease_seconds = float(settings.BEAT_LEASE_SECONDS)
        # Renewed at every tick, and a tick comes at least this often.
        self.renew_every = self.lease_seconds / 3
        self.owner = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"
        self.active = False
        super().__init__(*args, **kwargs)
        self.max_interval = min(self.max_interval, self.renew_every)

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.hold_lease():
            return self.renew_every
        return min(super().tick(*args, **kwargs), self.renew_every)

    def hold_lease(self) -> bool:
        """Take or renew the lease; on taking it, reload every job from the database."""
        try:
            close_old_connections()
            held = locks.acquire([BEAT_LEASE], owner=self.owner, ttl=self.ttl) is not None
        except (DatabaseError, InterfaceError) as exc:
            # Without the database there is no lease: send nothing rather than risk a twin.
            logger.warning("beat %s: cannot reach the database for its lease: %s", self.owner, exc)
            connection.close()
            held = False
        if held and not self.active:
            logger.info("beat %s holds the lease: it sends from now on", self.owner)
            self._reload_from_database()
        elif self.active and not held:
            logger.warning("beat %s lost the lease: standing by", self.owner)
        self.active = held
        return held

    def _reload_from_database(self) -> None:
        # The last holder's sends are in the database (last_run_at), not in this process's
        # copy, which may be as old as this beat's start.
        self._dirty.clear()
        self._initial_read = True
        self._heap = None
        # The change marker as of now: otherwise the first tick would see every change made
        # while this beat stood by, and load the schedule a second time halfway through.
        self._last_timestamp = self.Changes.last_change()

    def reserve(self, entry: ModelEntry) -> ModelEntry:
        new_entry = super().reserve(entry)
        # apply_entry writes it, under the lease; a later sync() must not write it again
        # (it could overwrite a newer holder's last_run_at with this older one).
        self._dirty.discard(new_entry.name)
        # The schedule keeps the entry that knows this run: a heap rebuilt from it (after a
        # change of any job) would otherwise find the job due again and send it twice.
        if self._schedule is not None and entry.name in self._schedule:
            self._schedule[entry.name] = new_entry
        return new_entry

    def apply_entry(self, entry: ModelEntry, producer: Any = None) -> None:
        if not self._record_send(entry):
            logger.warning("beat %s: lease lost, %s not sent", self.owner, entry.name)
            self.active = False
            return
        super().apply_entry(entry, producer=producer)

    def _record_send(self, entry: ModelEntry) -> bool:
        """Renew the lease and write the job's run in one transaction; False if the lease is
        someone else's now (or the database is away): then nothing may be sent."""
        model = entry.model
        try:
            with transaction.atomic():
                if locks.extend([BEAT_LEASE.name], owner=self.owner, ttl=self.ttl) != 1:
                    return False
                PeriodicTask.objects.filter(pk=model.pk).update(
                    last_run_at=model.last_run_at, total_run_count=model.total_run_count
                )
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("beat %s: could not record %s: %s", self.owner, entry.name, exc)
            connection.close()
            return False
        return True

    def close(self) -> None:
        super().close()
        # A beat stopped cleanly hands over at once, not after its lease runs out.
        if self.active:
            try:
                locks.release([BEAT_LEASE.name], owner=self.owner)
            except (DatabaseError, InterfaceError):
                logger.warning("beat %s: could not release its lease", self.owner)
            self.active = False
