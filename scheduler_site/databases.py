"""DATABASE_URL parsing: SQLite (embedded default) or PostgreSQL (production)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.db import (
    DEFAULT_DB_ALIAS,
    InterfaceError,
    NotSupportedError,
    OperationalError,
    connection,
    connections,
)
from django.db.backends.postgresql.base import ServerBindingCursor
from psycopg import Cursor, DataError, RawCursor, pq
from psycopg.adapt import Loader
from psycopg.errors import FeatureNotSupported

from scheduler_site.env import env_str

SUPPORTED_ENGINES = {
    "django.db.backends.sqlite3",
    "django.db.backends.postgresql",
}


def sqlite_config(path: Path, *, test_path: Path) -> dict[str, Any]:
    # SQLite has no SKIP LOCKED and Django ignores select_for_update() there. IMMEDIATE makes
    # every atomic block take the write lock at BEGIN, so the pop's read-then-update cannot
    # interleave with another writer; WAL lets readers go on meanwhile, and the busy timeout
    # makes writers wait their turn instead of failing with "database is locked".
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;"
            ),
        },
        "TEST": {"NAME": str(test_path)},
    }


def prepare_threshold() -> int | None:
    """psycopg prepares a statement on the server after this many runs on one connection
    (DATABASE_PREPARE_THRESHOLD, default 1: at its second run; "off" never). Only the queue's
    hot statements are sent with server-side binding (`prepared_cursor`), so only they are
    ever prepared: a pop then skips planning, half of its database time. The default was
    psycopg's 5, but a threaded web process has a connection per thread, closed after
    CONN_MAX_AGE: at a quiet API a connection's statements often ran fewer than 5 times in its
    life, each planned anew (the token check's plan took longer than its run), and that is the
    idle long poll's path (README, "Long poll"). Preparing costs one round trip per statement
    and connection. Not 0: a statement's first run stays unprepared, so a test or a DEBUG
    query log that watches a fresh connection still sees its SQL (Django shows none for a
    prepared run). Behind PgBouncer in transaction mode this needs PgBouncer 1.21 or later
    with max_prepared_statements > 0, or "off"."""
    text = env_str("DATABASE_PREPARE_THRESHOLD", "1").strip().lower()
    if text in {"off", "none", ""}:
        return None
    if not text.isdigit():
        raise ImproperlyConfigured(
            f"DATABASE_PREPARE_THRESHOLD must be a whole number or 'off', not {text!r}."
        )
    return int(text)


def prepared_cursor() -> Any:
    """A cursor for the statements run on every pop, claim and report, and every API request's
    token check: on PostgreSQL Django's own cursor wrapper (query logging, error translation,
    the health check) around a psycopg cursor that binds its parameters on the server, so
    psycopg prepares the statement once it has run `prepare_threshold` times on the
    connection. Django's default cursor binds on the client and can never be prepared; it stays
    the default for every other query (the ORM does not always generate preparable SQL).
    Django has no public hook for this; `_prepare_cursor` is what its `cursor()` runs."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        return connection._prepare_cursor(ServerBindingCursor(connection.connection))


T = TypeVar("T")


def read_as_health_check(read: Callable[[], T]) -> T:
    """Run `read` (one read-only statement, safe to run twice) as the connection's health
    check. With CONN_HEALTH_CHECKS, Django sends `SELECT 1` before the first statement of each
    request: a round trip of its own, on every API request. The request's first statement (the
    token check) can be that check: if it fails because the connection is dead (the server
    restarted, a proxy dropped it), the connection is closed and `read` runs once more on a
    new one, which is what the health check would have done; an error on a live connection is
    raised as it is. Outside a transaction only (nothing to lose by reconnecting)."""
    if (
        connection.vendor != "postgresql"
        or not connection.health_check_enabled
        or connection.health_check_done
        or connection.in_atomic_block
        or connection.connection is None  # a new connection is checked by connecting
    ):
        return read()
    connection.health_check_done = True
    try:
        return read()
    except (OperationalError, InterfaceError):
        if connection.is_usable():
            raise
        connection.close()
        return read()


class _JsonbBinaryAsText(Loader):
    """jsonb in binary format, given as its text: what Django's own (text-format) jsonb loader
    gives, so JSONField's converter does what it does on every other query. (timestamptz needs
    no such loader: in binary, psycopg gives the session's time zone, which Django sets.)"""

    format = pq.Format.BINARY

    def load(self, data: Any) -> str:
        raw = bytes(data)
        if raw[:1] != b"\x01":
            raise DataError("unknown jsonb binary format version")
        return raw[1:].decode()


def hot_rows(sql: str, params: Any, *, db: Any = None) -> list[tuple[Any, ...]]:
    """The rows of one of the statements run on every pop, claim and report. On PostgreSQL
    through one psycopg cursor kept per connection, binding on the server (so preparable, see
    prepared_cursor) and reading binary results: measured, a single-task pop spent 40 % of its
    client CPU in Django's cursor wrapper, the cursor's creation, the `connection` proxy's
    lookups and text parsing of its timestamps. Errors are Django's (wrap_database_errors) and
    the connection's health check runs as for any cursor. While something observes the
    queries (connection.queries under DEBUG or a test's CaptureQueriesContext, an
    execute_wrapper), the statement goes through Django's cursor instead, so it is seen and
    counted like every other. `db`: the caller's connections[DEFAULT_DB_ALIAS], if it has it
    (that lookup goes through asgiref's Local: a few microseconds a call)."""
    if db is None:
        db = connections[DEFAULT_DB_ALIAS]  # the proxy `connection` costs a lookup per use
    if db.vendor != "postgresql":
        return _hot_rows_once(sql, params, db)
    return replanned_once(db, lambda: _hot_rows_once(sql, params, db))


def _hot_rows_once(sql: str, params: Any, db: Any) -> list[tuple[Any, ...]]:
    if db.vendor != "postgresql" or db.queries_logged or db.execute_wrappers:
        with prepared_cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    native = _native_query(sql) if isinstance(params, Mapping) else None
    if native is not None:
        text, names = native
        sql, params = text, [params[name] for name in names]
    cursor = _hot_cursor(db, raw=native is not None)
    with db.wrap_database_errors:
        cursor.execute(sql, params, binary=True)
        return cursor.fetchall()


STALE_PLAN = "cached plan must not change result type"


def replanned_once(db: Any, run: Callable[[], T]) -> T:
    """Run `run` (one statement through a prepared cursor); if the statement's prepared plan
    no longer fits its tables, run it once more on a new connection. A migration that changes
    the type of a column a prepared statement returns (`integer` to `bigint`, a longer
    `varchar`) makes PostgreSQL refuse every later run of that statement on every connection
    that prepared it, until the connection ends: after a deploy each web and worker process
    would fail its pops, claims and token checks for up to CONN_MAX_AGE, or for ever on a
    worker's kept connection. The refusal comes before the statement runs, so it changed
    nothing; outside a transaction closing the connection loses nothing either (its prepared
    statements go with it). Inside one the error stands: the transaction is aborted, and its
    rollback makes psycopg forget its prepared statements, so the caller's next try runs."""
    try:
        return run()
    except NotSupportedError as exc:
        if not _stale_plan(exc.__cause__) or db.in_atomic_block or not db.get_autocommit():
            raise
    db.close()
    return run()


def _stale_plan(error: BaseException | None) -> bool:
    # The message is translated when the server's lc_messages is not English; the function
    # that raises it is not (SQLSTATE 0A000 alone is every "feature not supported").
    if not isinstance(error, FeatureNotSupported):
        return False
    return error.diag.source_function == "RevalidateCachedQuery" or STALE_PLAN in str(error)


def _hot_cursor(db: Any, *, raw: bool = False) -> Cursor:
    db.close_if_health_check_failed()
    db.ensure_connection()
    connected = db.connection
    slot = "_hot_raw_cursor" if raw else "_hot_cursor"
    cursor = getattr(db, slot, None)
    if cursor is None or cursor.connection is not connected or cursor.closed:
        cursor = (RawCursor if raw else Cursor)(connected)
        cursor.adapters.register_loader("jsonb", _JsonbBinaryAsText)
        setattr(db, slot, cursor)
    return cursor


# psycopg keeps the conversion of a text's %(name)s placeholders to $n only for texts of at
# most 4096 characters (psycopg._queries.MAX_CACHED_STATEMENT_LENGTH); flow control's
# hand-outs are 4-9 kB, and converting one again on every pop (a regex pass, a part per
# placeholder) cost more client CPU than the rest of the pop's Python. A longer hot text is
# converted here once, and runs through a RawCursor, which takes $n as they are.
NATIVE_FROM_LENGTH = 4096
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s|%")
_NATIVE: dict[str, tuple[str, tuple[str, ...]] | None] = {}


def _native_query(sql: str) -> tuple[str, tuple[str, ...]] | None:
    """A long text with named placeholders only, as $n, and the names in $n order; None for
    a short text (psycopg caches those) or one with another kind of placeholder."""
    if len(sql) <= NATIVE_FROM_LENGTH:
        return None
    if sql not in _NATIVE:
        _NATIVE[sql] = _to_native(sql)
    return _NATIVE[sql]


def _to_native(sql: str) -> tuple[str, tuple[str, ...]] | None:
    names: list[str] = []
    parts: list[str] = []
    end = 0
    for match in _PLACEHOLDER.finditer(sql):
        if match.group(0) == "%":  # %s, %b, %t: positional, left to psycopg
            return None
        parts.append(sql[end : match.start()])
        end = match.end()
        if match.group(1) is None:  # %%
            parts.append("%")
            continue
        if match.group(1) not in names:
            names.append(match.group(1))
        parts.append(f"${names.index(match.group(1)) + 1}")
    return "".join([*parts, sql[end:]]), tuple(names)


def use_generic_plans(sender: Any, connection: Any, **_: Any) -> None:
    """connection_created: the prepared statements (only the hot ones, see prepared_cursor)
    always run their generic plan. PostgreSQL otherwise plans a prepared statement anew on
    each run while its generic plan's estimate looks worse, which it did for the pop (its
    LIMIT and `not_before <= $2`), so preparing saved nothing; EXPLAIN ANALYZE EXECUTE shows
    the same plan at a tenth of the planning time. A session setting, not a startup option:
    PgBouncer refuses the `options` startup parameter. It touches no unprepared query."""
    if connection.vendor == "postgresql" and prepare_threshold() is not None:
        with connection.cursor() as cursor:
            cursor.execute("SET plan_cache_mode = force_generic_plan")


def database_from_url(url: str, *, default_sqlite: Path) -> dict[str, Any]:
    if not url:
        return sqlite_config(default_sqlite, test_path=default_sqlite.with_name("test.sqlite3"))
    try:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
    except (ValueError, KeyError) as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
    engine = config.get("ENGINE", "")
    if engine not in SUPPORTED_ENGINES:
        raise ImproperlyConfigured(
            f"DATABASE_URL uses an unsupported engine {engine!r}; use sqlite:/// or postgres://."
        )
    if engine == "django.db.backends.sqlite3":
        path = Path(config["NAME"])
        return sqlite_config(path, test_path=path.with_name(f"test_{path.name}"))
    config.setdefault("OPTIONS", {})["prepare_threshold"] = prepare_threshold()
    return config
