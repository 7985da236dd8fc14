"""The SQL of the health checks, by name. The checks of the apps' rows go through their
selectors (tasks.selectors); what is left is the database's own liveness probe."""

from __future__ import annotations

from django.db import connection

# The cheapest statement that proves a connection can run a query and read its answer.
PING = "SELECT 1"


def database_answers() -> bool:
    """Whether the default database runs PING; raises what the driver raises when it cannot."""
    with connection.cursor() as cursor:
        cursor.execute(PING)
        return cursor.fetchone() == (1,)
