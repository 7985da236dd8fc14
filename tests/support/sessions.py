"""A second PostgreSQL session beside the test's own connection: what another process (a
migration, a restamp, a server restart) does to the database the test is using."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from django.db import connection


@contextmanager
def other_session(*, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    """A new psycopg connection to the test database, with a lock timeout: a lock the test
    left held fails it instead of hanging it."""
    params = connection.get_connection_params()
    wanted = {k: params[k] for k in ("dbname", "user", "password", "host", "port") if k in params}
    with psycopg.connect(**wanted, autocommit=autocommit) as other:
        other.execute("SET lock_timeout = '10s'")
        yield other
