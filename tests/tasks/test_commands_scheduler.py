"""`manage.py scheduler create/update`: every field the API sets, and the same refusals."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks.models import Scheduler
from tasks.serializers import SCHEDULER_SETTABLE, SchedulerSerializer


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_scheduler_command__sets_what_the_api_sets(capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI's list and the serializer's disagreed (no policy_weights, no retry_jitter).
    writable = {name for name, f in SchedulerSerializer().fields.items() if not f.read_only}
    assert writable == {"id", *SCHEDULER_SETTABLE}
    with pytest.raises(SystemExit):
        call_command("scheduler", "update", "--help")
    text = capsys.readouterr().out
    for name in SCHEDULER_SETTABLE:
        assert f"--{name.replace('_', '-')}" in text


@pytest.mark.django_db
def test_scheduler_command__policy_weights_and_jitter() -> None:
    run(
        "scheduler", "create", "q", "--policy-weights", '{"highest_priority_first": 1}',
        "--retry-jitter", "no",
    )  # fmt: skip
    q = Scheduler.objects.get(id="q")
    assert (q.policy_weights, q.retry_jitter) == ({"highest_priority_first": 1}, False)

    run("scheduler", "update", "q", "--policy-weights", '{"never_run_first": 3}')
    assert Scheduler.objects.get(id="q").policy_weights == {"never_run_first": 3}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ('{"fastest_first": 1}', "--policy-weights: unknown policies"),
        ('{"never_run_first": 0}', "--policy-weights: at least one weight"),
        ('{"never_run_first": 1.5}', "--policy-weights: weights must be whole numbers"),
        ("{}", "--policy-weights: must be an object"),
        ("[1]", "--policy-weights: must be a JSON object"),
        ("{nope", "--policy-weights: not valid JSON"),
        ('{"a": ' * 70 + "1" + "}" * 70, "--policy-weights: JSON nested deeper than 64"),
        ("[" * 5000 + "]" * 5000, "--policy-weights: JSON nested deeper than 64"),
    ],
)
def test_scheduler_command__bad_policy_weights_are_refused(weights: str, message: str) -> None:
    Scheduler.objects.create(id="q")
    with pytest.raises(CommandError, match=message):
        run("scheduler", "update", "q", "--policy-weights", weights)
    assert Scheduler.objects.get(id="q").policy_weights == Scheduler().policy_weights
