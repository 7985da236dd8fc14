"""What every manage.py command of ours shares (issue 13, part 5): subcommands, --help with
help text and a default for every option, sorted; --json on every list and show; results on
stdout and logs on stderr; create/update options that are the API's writable fields."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import load_command_class

from pilots.serializers import ComputeElementSerializer, VOSerializer
from schedules.serializers import ScheduleSerializer, ScheduleUpdateSerializer
from tasks.management.commands._base import HelpFormatter, OurCommand
from tasks.serializers import SCHEDULER_SETTABLE, TaskPushSerializer

OURS = {
    "tasks": ["scheduler", "task", "runner", "api_token", "create_api_user", "health", "workers"],
    "schedules": ["schedule", "import_beat", "orchestrate"],
    "pilots": ["pilots", "vo", "ce"],
}
COMMANDS = [(app, name) for app, names in OURS.items() for name in names]


def parsers(app: str, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """The command's parser and each of its subcommands' ("" for the command itself)."""
    command = load_command_class(app, name)
    assert isinstance(command, OurCommand), f"{name} does not share the base"
    parser = command.create_parser("manage.py", name)
    found = [("", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.items())
    return found


def options_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    formatter = HelpFormatter(prog="manage.py")
    return {
        action.option_strings[-1]: formatter._get_help_string(action)
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    }


@pytest.mark.parametrize(("app", "name"), COMMANDS)
def test_help__every_option_has_help_and_a_default(app: str, name: str) -> None:
    for sub, parser in parsers(app, name):
        assert parser.formatter_class is HelpFormatter, f"{name} {sub}"
        assert parser.description, f"{name} {sub}: no description"
        for option, text in options_help(parser).items():
            where = f"{name} {sub} {option}"
            assert len(text.split("(")[0].strip()) > 5, f"{where}: no help text"
            assert "default:" in text or "required" in text, f"{where}: no default shown"
        for action in parser._actions:
            if not action.option_strings and action.dest != "action":
                assert action.help, f"{name} {sub} {action.dest}: positional without help"


def test_help__options_are_listed_sorted_by_name() -> None:
    [(_, update)] = [p for p in parsers("tasks", "scheduler") if p[0] == "update"]
    text = update.format_help()
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert listed == sorted(listed) and "--max-queue-size" in listed


@pytest.mark.parametrize(("app", "name"), COMMANDS)
def test_json__on_every_list_and_show(app: str, name: str) -> None:
    for sub, parser in parsers(app, name):
        if sub in {"list", "show"}:
            assert "--json" in options_help(parser), f"{name} {sub} has no --json"


@pytest.mark.parametrize(
    ("command", "action", "serializer", "exclude"),
    [
        ("scheduler", "create", None, ()),
        ("task", "push", TaskPushSerializer, ()),
        ("schedule", "create", ScheduleSerializer, ()),
        ("schedule", "update", ScheduleUpdateSerializer, ()),
        ("vo", "update", VOSerializer, ("name",)),
        ("ce", "create", ComputeElementSerializer, ("name",)),
    ],
)
def test_options__are_the_apis_writable_fields(
    command: str, action: str, serializer: type | None, exclude: tuple[str, ...]
) -> None:
    """One list for the API and the CLI: a field another branch adds to a serializer (or to
    SCHEDULER_SETTABLE) becomes an option with no change to the command."""
    app = next(app for app, names in OURS.items() if command in names)
    [(_, parser)] = [p for p in parsers(app, command) if p[0] == action]
    if serializer is None:
        fields = set(SCHEDULER_SETTABLE)
    else:
        fields = {n for n, f in serializer().get_fields().items() if not f.read_only}
    options = set(options_help(parser)) - {"--json", "--scheduler"}
    expected = {f"--{n.replace('_', '-')}" for n in fields - set(exclude) - {"scheduler"}}
    assert options == expected


def test_output__logs_on_stderr_json_alone_on_stdout(tmp_path: Path) -> None:
    """A command that logs at INFO (the service logs each created schedule) still prints one
    JSON document and nothing else on stdout."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings",
        "DEBUG": "1",
        "SECRET_KEY": "test-only-" + "x" * 50,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "LOG_LEVEL": "INFO",
    }
    manage = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*manage, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        return done

    run("migrate", "--no-input", "-v", "0")
    run("scheduler", "create", "q1")
    made = run("schedule", "create", "--scheduler", "q1", "--interval-seconds", "60", "--json")

    assert json.loads(made.stdout)["scheduler"] == "q1"
    assert "INFO schedules.services schedule" in made.stderr
    listed = run("schedule", "list", "--json")
    assert [row["id"] for row in json.loads(listed.stdout)] == [json.loads(made.stdout)["id"]]
