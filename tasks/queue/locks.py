"""The SQL of tasks.locks (mutexes as lease rows), named and built from `Lock._meta.db_table`.

Part of the tasks app's one SQL package (tasks.queue); no statement here writes a task.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from django.db import connection

from tasks.models import Lock


def _column(field: str) -> str:
    return connection.ops.quote_name(Lock._meta.get_field(field).column)


def _acquire_sql() -> str:
    # One statement on both databases: a free lock is inserted; a held one is taken over only
    # when its lease expired or the owner is already ours (re-entry), so a live lock is never
    # stolen. RETURNING says who holds it now.
    table = connection.ops.quote_name(Lock._meta.db_table)
    name, owner, acquired, expires = map(_column, ("name", "owner", "acquired_at", "expires_at"))
    return (
        f"INSERT INTO {table} ({name}, {owner}, {acquired}, {expires}) VALUES (%s, %s, %s, %s) "
        f"ON CONFLICT ({name}) DO UPDATE SET {owner} = excluded.{owner}, "
        f"{acquired} = excluded.{acquired}, {expires} = excluded.{expires} "
        f"WHERE {table}.{expires} < %s OR {table}.{owner} = excluded.{owner} "
        f"RETURNING {owner}"
    )


def _live_sql(count: int) -> str:
    # A semaphore's slots held by a live lease (its slot count varies, so built per count).
    table = connection.ops.quote_name(Lock._meta.db_table)
    name, owner, expires = map(_column, ("name", "owner", "expires_at"))
    names = ", ".join(["%s"] * count)
    return f"SELECT {name}, {owner} FROM {table} WHERE {name} IN ({names}) AND {expires} >= %s"


# The statements, by name (texts built once: they quote the table and column names).
LOCK_STATEMENTS: dict[str, Callable[[], str]] = {"acquire": _acquire_sql}
_BUILT: dict[str, str] = {}


def statement(name: str) -> str:
    if name not in _BUILT:
        _BUILT[name] = LOCK_STATEMENTS[name]()
    return _BUILT[name]


def _prep(field: str, value: object) -> object:
    return Lock._meta.get_field(field).get_db_prep_value(value, connection)


def try_acquire(*, name: str, owner: str, now: datetime, expires_at: datetime) -> bool:
    """Insert or take over the lock row `name` for `owner`; whether `owner` holds it now."""
    stamp = _prep("acquired_at", now)
    params = [name, owner, stamp, _prep("expires_at", expires_at), stamp]
    with connection.cursor() as cursor:
        cursor.execute(statement("acquire"), params)
        row = cursor.fetchone()
    return row is not None and row[0] == owner


def live_owners(*, names: list[str], now: datetime) -> dict[str, str]:
    """Lock name -> owner of those of `names` held by a live lease at `now`."""
    with connection.cursor() as cursor:
        cursor.execute(_live_sql(len(names)), [*names, _prep("expires_at", now)])
        return dict(cursor.fetchall())
