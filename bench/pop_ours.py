"""Our side of the pop bench: the task table seeded with SQL built from the model (table and
column names from `Task._meta`), the service call, and the HTTP calls against gunicorn: the
DRF API as a runner account sees it, and the plain Django view of bench/plain_views.py.
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import Any

from bench.cells import CLIENT_APP, Caller, Spec
from bench.common import execute, table, vacuum

POP_QUEUE = "bench-pop"  # no finished rows
FULL_QUEUE = "bench-pop-1m"  # the same, beside a million finished rows
PUSH_QUEUE = "bench-push"
RUNNER = "bench-runner"
OPERATOR = "bench-operator"

# Seeding: SQL expressions per column over generate_series (g); columns not named here get
# NULL or their model default, so a field added to Task does not break the seed.
FINISHED_SOURCE = (
    "(SELECT g, now() - interval '3 days' + g * interval '100 milliseconds' AS ts "
    "FROM generate_series(%(first)s, %(last)s) AS g) AS s"
)
FINISHED_COLUMNS = {
    "id": "gen_random_uuid()",
    "scheduler_id": "%(scheduler)s",
    "status": "'COMPLETED'",
    "priority": "g %% 4",
    "data": "jsonb_build_object('n', g)",
    "result": "'{\"ok\": true}'::jsonb",
    "attempts": "1",
    "not_before": "ts",
    "worker": "'bench-seed'",
    "created_at": "ts",
    "modified_at": "ts + interval '1 second'",
}
QUEUED_SOURCE = "generate_series(1, %(count)s) AS g"
QUEUED_COLUMNS = {
    "id": "gen_random_uuid()",
    "scheduler_id": "%(scheduler)s",
    "status": "'QUEUED'",
    "priority": "g %% 4",
    "data": "jsonb_build_object('n', g)",
    "attempts": "0",
    "not_before": "now() - interval '1 minute'",
    "created_at": "now() - interval '1 hour' + g * interval '1 microsecond'",
    "modified_at": "now() - interval '1 hour'",
}


def seed_sql(columns: dict[str, str], source: str) -> tuple[str, dict[str, Any]]:
    """INSERT … SELECT into the task table: `columns` gives expressions, the rest defaults."""
    from django.db import connection

    from tasks.models import Task

    names, values, params = [], [], {}
    for task_field in Task._meta.concrete_fields:
        names.append(connection.ops.quote_name(task_field.column))
        default = None if task_field.null else task_field.get_default()
        if task_field.column in columns:
            values.append(columns[task_field.column])
        elif default is None:
            if not task_field.null:
                sys.exit(f"pop_bench: no seed value for {Task._meta.db_table}.{task_field.column}")
            values.append("NULL")
        else:
            key = f"default_{task_field.column}"
            values.append(f"%({key})s")
            params[key] = task_field.get_db_prep_save(default, connection)
    sql = f"INSERT INTO {table(Task)} ({', '.join(names)}) SELECT {', '.join(values)} FROM {source}"
    return sql, params


def prepare_queues() -> tuple[str, str]:
    """Our three pull queues, emptied; tokens of a runner account (the API's default reach:
    every queue) and of an operator (a runner may pop and report, not push)."""
    from tasks import accounts, services
    from tasks.models import Scheduler

    for queue_id in (POP_QUEUE, FULL_QUEUE, PUSH_QUEUE):
        if not Scheduler.objects.filter(id=queue_id).exists():
            services.scheduler_create(id=queue_id, kind="pull")
        clear(queue_id, keep_finished=queue_id == FULL_QUEUE)
    runner = accounts.account_set_up(username=RUNNER, role="runner").user
    operator = accounts.account_set_up(username=OPERATOR, role="operator").user
    return accounts.token_create(user=runner)[1], accounts.token_create(user=operator)[1]


def clear(queue_id: str, *, keep_finished: bool = True) -> None:
    """Drop a queue's rows (but its seeded finished ones) and their events."""
    from tasks.models import Task, TaskEvent

    keep = "AND t.status <> 'COMPLETED'" if keep_finished else ""
    execute(
        f"DELETE FROM {table(TaskEvent)} e USING {table(Task)} t "
        f"WHERE e.task_id = t.id AND t.scheduler_id = %(queue)s {keep}",
        {"queue": queue_id},
    )
    keep = "AND status <> 'COMPLETED'" if keep_finished else ""
    execute(f"DELETE FROM {table(Task)} WHERE scheduler_id = %(queue)s {keep}", {"queue": queue_id})


def grow_finished(want: int, chunk: int = 250_000) -> None:
    """COMPLETED tasks in FULL_QUEUE until it holds `want` of them (kept across rounds)."""
    from tasks.models import Task, TaskEvent

    have = Task.objects.filter(scheduler_id=FULL_QUEUE, status="COMPLETED").count()
    sql, params = seed_sql(FINISHED_COLUMNS, FINISHED_SOURCE)
    for first in range(have + 1, want + 1, chunk):
        last = min(want, first + chunk - 1)
        execute(sql, {**params, "scheduler": FULL_QUEUE, "first": first, "last": last})
    vacuum(Task, TaskEvent)


def fill(queue_id: str, count: int) -> None:
    """The queue holds exactly `count` due QUEUED tasks, freshly vacuumed."""
    from tasks.models import Task, TaskEvent

    clear(queue_id)
    clear(PUSH_QUEUE)
    if count:
        sql, params = seed_sql(QUEUED_COLUMNS, QUEUED_SOURCE)
        execute(sql, {**params, "scheduler": queue_id, "count": count})
    vacuum(Task, TaskEvent)


# --- the service -----------------------------------------------------------------------------


def service_connect(queue_id: str, limit: int):  # -> Callable[[Spec, int], Caller]
    def connect(spec: Spec, index: int) -> Caller:
        from django.db import connection

        from tasks import services

        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('application_name', %s, false)", [CLIENT_APP])
            cursor.execute("SELECT pg_backend_pid()")
            backend = int(cursor.fetchone()[0])
        worker = f"bench-{index}"

        def call() -> int:
            return len(services.task_pop(scheduler_id=queue_id, limit=limit, worker=worker))

        return Caller(call, connection.close, backend)

    return connect


# --- HTTP ------------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP connection to gunicorn (a sync worker closes it after each answer;
    http.client then opens the next one itself)."""

    def __init__(self, spec: Spec, *, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", spec.port, timeout=60)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Token {token}"

    def send(self, method: str, path: str, body: Any, expect: int = 200) -> Any:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=json.dumps(body), headers=self.headers)
                response = self.conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed the kept-alive connection: once more
                if attempt == 2:
                    raise
        if response.status != expect:
            text = payload[:300].decode(errors="replace").replace("\n", " ")
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {text}")
        return json.loads(payload)


def http_pop(prefix: str, limit: int, *, token: bool = True):  # -> connect
    def connect(spec: Spec, index: int) -> Caller:
        client = Client(spec, token=spec.token if token else "")
        path = f"{prefix}/schedulers/{POP_QUEUE}/pop/"

        def call() -> int:
            return len(client.send("POST", path, {"limit": limit})["results"])

        return Caller(call, client.conn.close)

    return connect


def http_push(prefix: str, batch: int, *, token: bool = True):  # -> connect
    def connect(spec: Spec, index: int) -> Caller:
        client = Client(spec, token=spec.operator_token if token else "")
        path = f"{prefix}/schedulers/{PUSH_QUEUE}/push/"
        left = [spec.share]

        def call() -> int:
            size = min(batch, left[0])
            if size <= 0:
                return 0
            items = [{"data": {"n": index, "i": left[0] - i}} for i in range(size)]
            if batch == 1:
                client.send("POST", path, items[0], expect=201)
            else:
                results = client.send("POST", path, items)["results"]
                assert all(r["status"] == 201 for r in results), results[:3]
            left[0] -= size
            return size

        return Caller(call, client.conn.close)

    return connect


def http_report(prefix: str, batch: int, *, token: bool = True):  # -> connect
    """Each process first pops its share over the API (not measured), then reports those
    tasks COMPLETED with their lease tokens: one PATCH each, or batches of `batch`."""

    def connect(spec: Spec, index: int) -> Caller:
        popper = Client(spec, token=spec.token)
        held: list[dict[str, Any]] = []
        while len(held) < spec.share:
            got = popper.send("POST", f"/api/schedulers/{POP_QUEUE}/pop/", {"limit": 100})
            if not got["results"]:
                break
            held += [{"id": t["id"], "lease_token": t["lease_token"]} for t in got["results"]]
        popper.conn.close()
        client = Client(spec, token=spec.token if token else "")
        return Caller(_reporter(client, prefix, held, batch), client.conn.close)

    return connect


def _reporter(client: Client, prefix: str, held: list[dict[str, Any]], batch: int):
    def call() -> int:
        chunk = [held.pop() for _ in range(min(batch, len(held)))]
        if not chunk:
            return 0
        if batch == 1:
            body = {"status": "COMPLETED", "lease_token": chunk[0]["lease_token"], "result": {}}
            method = "PATCH" if prefix == "/api" else "POST"
            client.send(method, f"{prefix}/tasks/{chunk[0]['id']}/", body)
        else:
            reports = [{**t, "status": "COMPLETED", "result": {}} for t in chunk]
            results = client.send("POST", f"{prefix}/tasks/report/", {"reports": reports})
            assert all(r["status"] == 200 for r in results["results"]), results["results"][:3]
        return len(chunk)

    return call
