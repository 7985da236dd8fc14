"""manage.py commands for tasks and schedulers, and create_api_user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from knox.crypto import hash_token
from knox.models import AuthToken
from time_machine import TimeMachineFixture

from tasks import accounts, services
from tasks.models import RunnerGrant, Scheduler, Task, TaskEvent, TaskStatus
from tasks.retry import RetrySpec
from tests.tasks.helpers import SYSTEM_QUEUES, T0, user_schedulers

S = TaskStatus
Push = Callable[..., Task]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _dead(push: Push, **kwargs: Any) -> Task:
    task = push(**kwargs)
    services.task_pop(scheduler_id=task.scheduler_id, filters={"n": task.data["n"]})
    services.task_fail(task_id=task.id, retry=RetrySpec(policy="none", dead_letter=True))
    return task


# --- task ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_task_push__prints_the_task(scheduler: Scheduler) -> None:
    out = run(
        "task", "push", "--scheduler", "boefje", "--data", '{"org": "a"}', "--priority", "3",
        "--json",
    )  # fmt: skip
    printed = json.loads(out)
    task = Task.objects.get(id=printed["id"])
    assert (task.data, task.priority, task.status) == ({"org": "a"}, 3, S.QUEUED)
    assert TaskEvent.objects.get(task=task).actor == "cli"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"x": Infinity}', "Must not contain Infinity or NaN"),
        ('{"x": "\\ud800"}', "Must not contain a lone UTF-16 surrogate"),
    ],
)
def test_task_push__bad_data_names_the_option(
    scheduler: Scheduler, data: str, message: str
) -> None:
    with pytest.raises(CommandError, match=f"--data: {message}"):
        run("task", "push", "--scheduler", "boefje", "--data", data)
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_task_push__not_before_and_checks_as_the_api(scheduler: Scheduler) -> None:
    out = run(
        "task", "push", "--scheduler", "boefje", "--not-before", "2030-01-01T12:00:00+01:00",
        "--json",
    )  # fmt: skip
    assert json.loads(out)["not_before"] == "2030-01-01T11:00:00Z"
    with pytest.raises(CommandError, match="--not-before: '2030-01-01T12:00:00': give an ISO"):
        run("task", "push", "--scheduler", "boefje", "--not-before", "2030-01-01T12:00:00")
    with pytest.raises(CommandError, match="invalid: --priority: Ensure this value"):
        run("task", "push", "--scheduler", "boefje", "--priority", str(2**31))
    with pytest.raises(CommandError, match="invalid: --hash: Ensure this field"):
        run("task", "push", "--scheduler", "boefje", "--hash", "h" * 65)
    assert Task.objects.count() == 1


@pytest.mark.django_db
def test_task_push__refusals_are_command_errors(scheduler: Scheduler) -> None:
    with pytest.raises(CommandError, match="404"):
        run("task", "push", "--scheduler", "nope")
    run("task", "push", "--scheduler", "boefje", "--hash", "h")
    with pytest.raises(CommandError, match="409"):
        run("task", "push", "--scheduler", "boefje", "--hash", "h")
    assert Task.objects.count() == 1


@pytest.mark.django_db
def test_task_pop__leases_and_prints(push: Push) -> None:
    push(data={"org": "a"})
    wanted = push(data={"org": "b"})

    out = run(
        "task", "pop", "--scheduler", "boefje", "--filters", '{"org": "b"}', "--worker", "w1",
        "--json",
    )  # fmt: skip

    [printed] = json.loads(out)
    assert printed["id"] == str(wanted.id) and printed["status"] == S.DISPATCHED
    assert Task.objects.get(id=wanted.id).worker == "w1"
    assert printed["lease_token"], "the holder gets its lease token"
    again = json.loads(run("task", "pop", "--scheduler", "boefje", "--limit", "5", "--json"))
    assert again[0]["data"] == {"org": "a"}
    assert json.loads(run("task", "pop", "--scheduler", "boefje", "--json")) == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "limit"),
        (["--filters", "{bad"], "--filters"),
        (["--filters", '{"a b": 1}'], "filters"),
    ],
)
def test_task_pop__bad_input(push: Push, args: list[str], message: str) -> None:
    push()
    with pytest.raises(CommandError, match=message):
        run("task", "pop", "--scheduler", "boefje", *args)
    assert Task.objects.get().status == S.QUEUED


@pytest.mark.django_db
def test_task_list__filters(push: Push, make_scheduler: Callable[..., Scheduler]) -> None:
    make_scheduler("other")
    a, b = push(hash="ha"), push(scheduler_id="other")
    dead = _dead(push, data={"n": 1})

    everything = run("task", "list")
    assert all(str(t.id) in everything for t in (a, b, dead))
    only_other = run("task", "list", "--scheduler", "other")
    assert str(b.id) in only_other and str(a.id) not in only_other
    only_dead = run("task", "list", "--status", "DEAD")
    assert str(dead.id) in only_dead and str(a.id) not in only_dead
    assert str(a.id) in run("task", "list", "--hash", "ha")
    assert json.loads(run("task", "list", "--schedule", str(uuid.uuid4()), "--json")) == []
    assert len(run("task", "list", "--limit", "1").splitlines()) == 3  # header, rule, one
    assert len(json.loads(run("task", "list", "--limit", "1", "--json"))) == 1


@pytest.mark.django_db
def test_task_show_and_events(push: Push) -> None:
    task = push(data={"n": 1})
    services.task_pop(scheduler_id="boefje")

    shown = json.loads(run("task", "show", str(task.id), "--json"))
    assert (shown["id"], shown["status"]) == (str(task.id), S.DISPATCHED)
    assert f"status                {S.DISPATCHED}" in run("task", "show", str(task.id))
    events = json.loads(run("task", "events", str(task.id), "--json"))
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        ("", S.QUEUED),
        (S.QUEUED, S.DISPATCHED),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["show", "events", "cancel"])
def test_task_show_events_cancel__unknown_or_bad_id(scheduler: Scheduler, action: str) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        run("task", action, "7d1e2a9c-0000-4000-8000-000000000000")
    with pytest.raises(CommandError, match="neither a task id nor 4\\+ hex digits"):
        run("task", action, "nope")
    with pytest.raises(CommandError, match="No task id starts with '7d1e2a9c'"):
        run("task", action, "7d1e2a9c")


@pytest.mark.django_db
def test_task_cancel(push: Push) -> None:
    queued = push(data={"n": 1})
    assert run("task", "cancel", str(queued.id)).strip() == f"{queued.id}: CANCELLED"

    running = push(data={"n": 2})
    services.task_pop(scheduler_id="boefje")
    services.task_start(task_id=running.id)
    assert "cancel requested (running)" in run("task", "cancel", str(running.id))
    assert Task.objects.get(id=running.id).cancel_requested_at is not None

    with pytest.raises(CommandError, match="409"):
        run("task", "cancel", str(queued.id))


@pytest.mark.django_db
def test_task_requeue__ids_and_all_dead(
    push: Push, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("other")
    one, two = _dead(push, data={"n": 1}), _dead(push, data={"n": 2})
    elsewhere = _dead(push, data={"n": 3}, scheduler_id="other")

    assert run("task", "requeue", str(one.id)).strip() == f"{one.id}: QUEUED"
    out = run("task", "requeue", "--all-dead", "boefje")

    assert out.strip() == f"{two.id}: QUEUED"
    assert Task.objects.get(id=one.id).status == Task.objects.get(id=two.id).status == S.QUEUED
    assert Task.objects.get(id=elsewhere.id).status == S.DEAD


@pytest.mark.django_db
def test_task_requeue__refusals(push: Push) -> None:
    queued, dead = push(data={"n": 0}), _dead(push, data={"n": 1})
    with pytest.raises(CommandError, match="Name tasks"):
        run("task", "requeue")
    err = StringIO()
    with pytest.raises(CommandError, match="1 of 2"):
        call_command("task", "requeue", str(queued.id), str(dead.id), stdout=StringIO(), stderr=err)
    assert f"{queued.id}: refused" in err.getvalue()
    assert Task.objects.get(id=dead.id).status == S.QUEUED


@pytest.mark.django_db
def test_task_requeue__all_dead_of_an_unknown_scheduler_says_so(push: Push) -> None:
    dead = _dead(push, data={"n": 1})

    with pytest.raises(CommandError, match=r"^Scheduler 'nope' does not exist\.$"):
        run("task", "requeue", "--all-dead", "nope")
    with pytest.raises(CommandError, match="Scheduler 'nope' does not exist"):
        run("task", "requeue", str(dead.id), "--all-dead", "nope")

    assert Task.objects.get(id=dead.id).status == S.DEAD  # refused before anything is done


@pytest.mark.django_db
def test_task_requeue__all_dead_with_none_dead_says_so_and_succeeds(push: Push) -> None:
    queued = push(data={"n": 0})
    failed = push(data={"n": 1})
    services.task_pop(scheduler_id="boefje", filters={"n": 1})
    services.task_fail(task_id=failed.id, retry=RetrySpec(policy="none", dead_letter=False))

    out = run("task", "requeue", "--all-dead", "boefje")
    with_ids = run("task", "requeue", str(failed.id), "--all-dead", "boefje")

    assert out.strip() == "nothing requeued"
    assert with_ids.splitlines() == [f"{failed.id}: QUEUED"]
    err = StringIO()
    call_command("task", "requeue", "--all-dead", "boefje", stdout=StringIO(), stderr=err)
    assert err.getvalue().strip() == "no DEAD tasks in boefje", "a note, on stderr"
    assert Task.objects.get(id=queued.id).status == S.QUEUED


@pytest.mark.django_db
def test_task_reap_and_prune(push: Push, time_machine: TimeMachineFixture) -> None:
    time_machine.move_to("2030-01-01T10:00:00Z", tick=False)
    lost = push(data={"n": 1})
    services.task_pop(scheduler_id="boefje")
    done = push(data={"n": 2})
    services.task_pop(scheduler_id="boefje")
    services.task_complete(task_id=done.id)

    assert run("task", "reap").splitlines() == ["reaped 0 expired leases", "expired 0 queued tasks"]
    time_machine.shift(timedelta(seconds=301))
    assert run("task", "reap").splitlines()[0] == "reaped 1 expired leases"
    assert Task.objects.get(id=lost.id).status == S.QUEUED

    assert run("task", "prune").strip() == "pruned 0 finished tasks"
    time_machine.shift(timedelta(days=2))
    assert (
        run("task", "prune", "--days", "1", "--dead-days", "1").strip() == "pruned 1 finished tasks"
    )
    assert list(Task.objects.values_list("id", flat=True)) == [lost.id]


@pytest.mark.django_db
def test_task_stats(push: Push, make_scheduler: Callable[..., Scheduler]) -> None:
    make_scheduler("other")
    push(), push()
    push(scheduler_id="other")
    services.task_pop(scheduler_id="boefje")

    lines = run("task", "stats", "--scheduler", "boefje").splitlines()[2:]  # header, rule

    assert [line.split()[2:] for line in lines] == [
        ["boefje", "DISPATCHED", "1"],
        ["boefje", "QUEUED", "2"],
    ]
    rows = json.loads(run("task", "stats", "--scheduler", "boefje", "--json"))
    assert sorted((r["status"], r["count"]) for r in rows) == [(S.DISPATCHED, 1), (S.QUEUED, 2)]
    assert "other" in run("task", "stats")


# --- scheduler -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_scheduler_create_update_list(push: Push) -> None:
    out = run(
        "scheduler", "create", "q2", "--max-queue-size", "5", "--retry-policy", "fixed",
        "--dead-letter", "no", "--description", "second",
    )  # fmt: skip
    assert out.strip() == "created q2"
    q2 = Scheduler.objects.get(id="q2")
    assert (q2.max_queue_size, q2.retry_policy, q2.dead_letter, q2.description) == (
        5,
        "fixed",
        False,
        "second",
    )

    assert run("scheduler", "update", "q2", "--max-attempts", "7").strip() == "updated q2"
    assert Scheduler.objects.get(id="q2").max_attempts == 7
    run("scheduler", "update", "q2", "--celery-queue", "slow-pool")
    assert Scheduler.objects.get(id="q2").celery_queue == "slow-pool"

    push()
    listing = run("scheduler", "list").splitlines()
    assert listing[0].split()[:2] == ["id", "kind"] and "queued" in listing[0]
    rows = {line.split()[0]: line.split() for line in listing[2:]}
    assert set(rows) - SYSTEM_QUEUES == {"boefje", "q2"}
    assert rows["boefje"][4] == "1" and rows["q2"][4] == "0"  # the queued column
    as_json = {row["id"]: row for row in json.loads(run("scheduler", "list", "--json"))}
    assert as_json["boefje"]["counts"][S.QUEUED] == 1 and as_json["q2"]["max_queue_size"] == 5


@pytest.mark.django_db
def test_scheduler_create_update__refusals(scheduler: Scheduler) -> None:
    with pytest.raises(CommandError, match="SCHEDULER_ID: scheduler with this id already exists"):
        run("scheduler", "create", "boefje")
    with pytest.raises(CommandError, match="invalid"):
        run("scheduler", "create", "Bad Id")
    with pytest.raises(CommandError, match=r"invalid: --max-attempts"):
        run("scheduler", "update", "boefje", "--max-attempts", "0")
    with pytest.raises(CommandError, match="does not exist"):
        run("scheduler", "update", "nope", "--max-attempts", "2")
    assert list(user_schedulers().values_list("id", "max_attempts")) == [("boefje", 3)]


@pytest.mark.django_db
def test_scheduler_pause_resume(push: Push) -> None:
    push()
    assert run("scheduler", "pause", "boefje").strip() == "paused boefje"
    assert Scheduler.objects.get(id="boefje").paused
    assert services.task_pop(scheduler_id="boefje") == []
    assert run("scheduler", "resume", "boefje").strip() == "resumed boefje"
    assert not Scheduler.objects.get(id="boefje").paused
    with pytest.raises(CommandError, match="404"):
        run("scheduler", "pause", "nope")


@pytest.mark.django_db
def test_scheduler_delete(push: Push) -> None:
    task = push()
    with pytest.raises(CommandError, match="active"):
        run("scheduler", "delete", "boefje")
    services.task_cancel(task_id=task.id)
    assert run("scheduler", "delete", "boefje").strip() == "deleted boefje"
    assert not user_schedulers().exists()


# --- create_api_user -------------------------------------------------------------------------


def printed_token(out: str) -> str:
    [key] = [line.split()[2] for line in out.splitlines() if "API token:" in line]
    return key


@pytest.mark.django_db
def test_create_api_user__password_and_token_once() -> None:
    first = run("create_api_user", "alice", "--role", "operator", "--operator-login")

    user = User.objects.get(username="alice")
    key = printed_token(first)
    assert list(AuthToken.objects.filter(user=user).values_list("digest", flat=True)) == [
        hash_token(key)
    ], "only the digest of the printed key is stored"
    [login] = [line for line in first.splitlines() if "admin login" in line]
    password = login.split("/")[1].split()[0]
    assert user.check_password(password) and user.is_staff and user.is_superuser
    assert list(user.groups.values_list("name", flat=True)) == ["operators"]

    second = run("create_api_user", "alice", "--role", "operator", "--operator-login")
    assert "API token:" not in second and "admin login" not in second
    assert "api_token create alice" in second, "says how to get a new token"
    quiet = run("create_api_user", "alice", "--quiet-if-exists")
    assert "API token:" not in quiet and password not in quiet
    assert User.objects.get(username="alice").check_password(password), "password unchanged"
    assert AuthToken.objects.filter(user=user).count() == 1, "re-running issues no token"


@pytest.mark.django_db
def test_create_api_user__runner_has_no_password() -> None:
    out = run("create_api_user", "bot")
    user = User.objects.get(username="bot")
    assert "admin login" not in out and accounts.token_matches(user=user, key=printed_token(out))
    assert not user.has_usable_password() and not user.is_staff
    assert user.has_perm("tasks.pop_task") and not user.has_perm("tasks.add_task")


@pytest.mark.django_db
def test_create_api_user__scheduler_limits_a_runner_each_run_anew(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("a")
    make_scheduler("b")
    out = run("create_api_user", "bot", "--scheduler", "a", "--scheduler", "b")
    assert "a, b only" in out

    def grants() -> list[str]:
        return sorted(
            RunnerGrant.objects.filter(user__username="bot").values_list("scheduler_id", flat=True)
        )

    assert grants() == ["a", "b"]
    run("create_api_user", "bot", "--scheduler", "b")
    assert grants() == ["b"]
    run("create_api_user", "bot")
    assert grants() == [], "without --scheduler: every queue"


@pytest.mark.django_db
def test_create_api_user__an_operator_is_never_limited(scheduler: Scheduler) -> None:
    run("create_api_user", "alice", "--role", "operator")
    with pytest.raises(CommandError, match="'alice' is an operator"):
        run("create_api_user", "alice", "--role", "runner", "--scheduler", "boefje")
    assert not RunnerGrant.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "nope"], "no such scheduler: nope"),
        (["--role", "operator", "--scheduler", "boefje"], "operators are never limited"),
        (["--expires-in", "soon"], "not a duration"),
    ],
)
def test_create_api_user__refusals_change_nothing(
    scheduler: Scheduler, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        run("create_api_user", "bot", *args)
    assert not User.objects.filter(username="bot").exists()


@pytest.mark.django_db
def test_create_api_user__expires_in(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)
    run("create_api_user", "bot", "--expires-in", "12h")
    assert AuthToken.objects.get(user__username="bot").expiry == T0 + timedelta(hours=12)


# --- api_token -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_token__create_list_revoke(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)
    run("create_api_user", "bot")
    user = User.objects.get(username="bot")

    created = run("api_token", "create", "bot", "--expires-in", "30d")
    key = printed_token(created)
    token = AuthToken.objects.get(digest=hash_token(key))
    assert token.expiry == T0 + timedelta(days=30) and "expires 2030-01-31 10:05:00Z" in created
    assert accounts.token_id(token) in created

    listing = run("api_token", "list", "--user", "bot")
    assert accounts.token_id(token) in listing and key not in listing
    assert key[:15] not in listing and token.digest not in listing, "no secret, no digest"
    assert len(listing.splitlines()) == 4  # header, rule, the first token, this one
    assert len(json.loads(run("api_token", "list", "--user", "bot", "--json"))) == 2

    assert run("api_token", "revoke", accounts.token_id(token)).strip() == "revoked 1 token"
    assert not accounts.token_matches(user=user, key=key)
    assert AuthToken.objects.filter(user=user).count() == 1
    assert run("api_token", "revoke", "--user", "bot").strip() == "revoked 1 token"
    assert not AuthToken.objects.filter(user=user).exists()


@pytest.mark.django_db
def test_api_token__list_marks_expired(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)
    run("create_api_user", "bot", "--expires-in", "1h")
    time_machine.shift(timedelta(hours=2))
    [row] = run("api_token", "list").splitlines()[2:]
    assert row.split()[1] == "bot" and row.endswith("expired")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "ghost"], "No account 'ghost'"),
        (["create", "bot", "--expires-in", "0d"], "not a duration"),
        (["revoke"], "Name token ids"),
        (["revoke", "0123456789ab"], "names no single token"),
        (["revoke", "abc"], "names no single token"),
    ],
)
def test_api_token__refusals(args: list[str], message: str) -> None:
    run("create_api_user", "bot")
    with pytest.raises(CommandError, match=message):
        run("api_token", *args)
    assert AuthToken.objects.count() == 1


# --- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["task"], ["push", "pop", "requeue", "reap", "prune", "stats"]),
        (["task", "push"], ["--scheduler", "--data", "--hash", "Lower runs first"]),
        (["task", "pop"], ["--limit", "--filters"]),
        (["task", "requeue"], ["--all-dead"]),
        (["task", "prune"], ["--days", "--dead-days"]),
        (["scheduler"], ["create", "update", "pause", "resume", "delete"]),
        (["scheduler", "create"], ["--max-queue-size", "--retry-policy", "--dead-letter"]),
        (["create_api_user"], ["--role", "--operator-login", "printed once"]),
    ],
)
def test_commands__help(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        call_command(*argv, "--help")
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in expected:
        assert word in text


@pytest.mark.parametrize("command", ["task", "scheduler", "create_api_user"])
def test_commands__help_through_manage_py(command: str) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test"}
    manage = Path(settings.BASE_DIR) / "manage.py"
    result = subprocess.run(
        [sys.executable, str(manage), command, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"manage.py {command}" in result.stdout and "usage:" in result.stdout


@pytest.mark.django_db
def test_task_requeue__refuses_a_running_task_naming_its_status(push: Push) -> None:
    task = push(data={"n": 1})
    [popped] = services.task_pop(scheduler_id=task.scheduler_id)
    services.task_start(task_id=popped.id)
    err = StringIO()

    with pytest.raises(CommandError):
        call_command("task", "requeue", str(task.id), stdout=StringIO(), stderr=err)

    assert "RUNNING" in err.getvalue()
    assert Task.objects.get(id=task.id).status == S.RUNNING
