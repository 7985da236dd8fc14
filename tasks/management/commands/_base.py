"""What every manage.py command of ours shares, so that they agree (issue 13, part 5):

- `manage.py NOUN ACTION [OBJECT] [--option …]`: the positional argument is the object the
  noun names (a queue id, a task id or a unique prefix of it, a schedule's id, name or hash,
  a VO or CE name); everything else is an option named after the API's field.
- `--help` lists options sorted by name, each with its help text and its default.
- Results on stdout (a table, or with `--json` one JSON document); progress and logs on stderr.
- Refusals are CommandErrors naming the problem (exit code 1), as the API's 4xx do.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    DjangoHelpFormatter,
)
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from scheduler_site.api_input import MAX_JSON_DEPTH, TOO_DEEP, json_depth
from scheduler_site.storable import unstorable
from tasks.exceptions import QueueError

# Options whose default argparse cannot show as the value itself.
_SILENT_DEFAULTS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def parse_json_object(raw: str | None, *, option: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    except RecursionError:
        raise CommandError(f"{option}: {TOO_DEEP}") from None  # as the API refuses it
    if json_depth(value) > MAX_JSON_DEPTH:
        raise CommandError(f"{option}: {TOO_DEEP}")
    if not isinstance(value, dict):
        raise CommandError(f"{option}: must be a JSON object.")
    why = unstorable(value)  # json.loads takes Infinity, NaN and lone surrogates
    if why is not None:
        raise CommandError(f"{option}: {why}")
    return value


def as_command_error(exc: QueueError) -> CommandError:
    return CommandError(f"{exc.message} (HTTP equivalent: {exc.http_status})")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


class HelpFormatter(DjangoHelpFormatter):
    """Django's (its own options last), with ours sorted by name and each default shown:
    `--help` reads the same for every command."""

    def add_arguments(self, actions: Iterable[argparse.Action]) -> None:
        super().add_arguments(sorted(actions, key=_sort_key))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or isinstance(action, _SILENT_DEFAULTS):
            return text
        if "default:" in text or "required" in text:
            return text
        if action.required:
            return f"{text} (required)".strip()
        return f"{text} (default: {_shown(action)})".strip()


def _sort_key(action: argparse.Action) -> tuple[int, str]:
    if not action.option_strings:
        return (0, "")  # positionals keep their order (sorted is stable)
    if isinstance(action, argparse._HelpAction):
        return (1, "")
    return (2, action.option_strings[-1].lstrip("-"))


def _shown(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or action.default == []:
        return "none"
    return "%(default)s"  # argparse fills it in (and the % must stay unescaped)


def render(renderable: Any, *, tty: bool) -> str:
    """A rich renderable as text: colours on a terminal only; wide when piped, so that a
    row stays on one line for grep."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=tty, width=None if tty else 200)
    console.print(renderable)
    if tty:
        return buffer.getvalue()
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    return "\n".join(lines).strip("\n") + "\n"  # no padding for grep, cut or awk


def cell(value: Any) -> Text:
    """Text, never rich markup: a task's data or error may hold `[brackets]`."""
    if value is None or value == "":
        return Text("-")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return Text(", ".join(value) or "-")  # names (a CE's VOs)
    if isinstance(value, dict | list):
        return Text(json.dumps(value, sort_keys=True, default=str))
    return Text(str(value))


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str = "") -> Table:
    grid = Table(
        *columns, title=title or None, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
    )
    for row in rows:
        grid.add_row(*(cell(value) for value in row))
    return grid


class OurCommand(BaseCommand):
    """The formatter, the output helpers and the error mapping of every command of ours."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        return super().create_parser(prog_name, subcommand, formatter_class=HelpFormatter, **kwargs)

    def execute(self, *args: Any, **options: Any) -> Any:
        self.as_json = bool(options.get("json"))
        try:
            return super().execute(*args, **options)
        except QueueError as exc:
            raise as_command_error(exc) from None
        except ValidationError as exc:
            raise CommandError(f"invalid: {_django_errors(exc)}") from None

    def result(self, value: Any, human: Callable[[], Any] | str | None = None) -> None:
        """Print a result: `value` as JSON with --json, else `human` (text or a renderable;
        its default is `value` itself)."""
        if self.as_json:
            self.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str))
            return
        shown = human() if callable(human) else (value if human is None else human)
        if isinstance(shown, str):
            self.stdout.write(shown)
        else:
            self.stdout.write(render(shown, tty=self.stdout.isatty()), ending="")

    def note(self, text: str) -> None:
        """Progress, not a result: stderr, so that stdout stays parseable."""
        self.stderr.write(text)


def _django_errors(exc: ValidationError) -> str:
    if not hasattr(exc, "error_dict"):
        return " ".join(exc.messages)
    return "; ".join(
        (f"--{field.replace('_', '-')}: " if field != "__all__" else "") + " ".join(msgs)
        for field, msgs in exc.message_dict.items()
    )


def fields_table(record: Mapping[str, Any]) -> Table:
    """One object (a `show`): a field and its value per line."""
    return table(["field", "value"], sorted(record.items()))


class SubcommandCommand(OurCommand):
    """A command with subcommands (`manage.py task push …`): `handle` calls `_<action>`."""

    def subcommands(self, parser: CommandParser) -> argparse._SubParsersAction:
        return parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    @staticmethod
    def action(
        sub: argparse._SubParsersAction, name: str, text: str, *, json_output: bool = True
    ) -> CommandParser:
        """One subcommand, with its help, our formatter and (for all that print a result)
        `--json`."""
        parser = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if json_output:
            parser.add_argument(
                "--json", action="store_true", help="Print one JSON document (the API's shape)."
            )
        return parser

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        getattr(self, f"_{action.replace('-', '_')}")(**options)
