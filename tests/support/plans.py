"""Query plans on PostgreSQL, for the tests that pin how a statement reaches its rows: the
statistics a deployment may have when a burst comes, and the generic plan of a prepared
statement (what every hot statement runs, see scheduler_site.databases)."""

from __future__ import annotations

from django.db import connection, transaction

from scheduler_site.databases import _to_native
from tasks import services
from tasks.batches import task_push_many
from tasks.models import Task, TaskStatus
from tests.support.seed import force_status, seed_queued


def analyzed_before_a_burst(scheduler_id: str, *, queued: int, leased: int) -> None:
    """A table of 5,000 finished tasks analyzed while nothing was queued or leased (a drained
    queue at night), then `queued` and `leased` tasks of `scheduler_id` more, as a burst
    brings them before autovacuum analyzes again (after a tenth of the table changed)."""
    services.scheduler_create(id=f"{scheduler_id}-done")
    seed_queued(f"{scheduler_id}-done", 5000)
    force_status(Task.objects.values_list("id", flat=True), TaskStatus.COMPLETED)
    services.scheduler_create(id=scheduler_id)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Task._meta.db_table}")
    pushes = [{"data": {"n": n}} for n in range(queued + leased)]
    task_push_many(scheduler_id=scheduler_id, pushes=pushes)
    for _ in range(0, leased, 500):
        services.task_pop(scheduler_id=scheduler_id, limit=min(500, leased), worker="w")


def generic_plan(sql: str, arguments: dict[str, tuple[str, str]]) -> str:
    """EXPLAIN of `sql`'s generic plan; `arguments`: by %(name)s parameter, its type and an
    SQL literal. Explained, not run."""
    native = _to_native(sql)
    assert native, "a statement with named parameters"
    text, names = native
    types = ", ".join(arguments[n][0] for n in names)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE explained({types}) AS {text}")
        cursor.execute(f"EXPLAIN EXECUTE explained({', '.join(arguments[n][1] for n in names)})")
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE explained")
    return plan
