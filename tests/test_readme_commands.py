"""The README's `manage.py` commands run as printed in a checkout after `make run`, with no
variable exported (issue 10, item 1): `make run` writes .env once (DEBUG=1, a generated key),
and every process reads it, so they also sign with one key.

The checkout is a copy of the project whose .venv is this one. It runs `make migrate` (all of
`make run` but the processes), then each command in an empty environment: every
`.venv/bin/python manage.py …` line of the README's code blocks, in order, as printed (issue
13, part 5); each must exit 0, and what a `--json` one prints must parse.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("manage.py", "Makefile", "pyproject.toml", "scheduler_site", "tasks", "schedules")
SOURCES += ("pilots", "templates")


def manage(
    checkout: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/python manage.py ARGS` in the checkout, in an empty environment and without
    a terminal (so a password prompt reads stdin)."""
    return subprocess.run(
        [str(checkout / ".venv" / "bin" / "python"), "manage.py", *args],
        cwd=checkout,
        env={},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def make(checkout: Path, target: str) -> str:
    """`make TARGET` in the checkout, with nothing but a PATH in its environment. -o: the
    install stamp counts as done, whatever the copied pyproject's time."""
    return ok(
        subprocess.run(
            [shutil.which("make") or "make", "-C", str(checkout), "-o", ".venv/.installed", target],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(ROOT / ".venv")
    # `make run` is this, then honcho: .env, migrate, the operator account, beat's jobs, demo.
    make(root, "migrate")
    return root


def readme_commands() -> list[str]:
    """The names of the commands the README runs as `.venv/bin/python manage.py NAME`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"\.venv/bin/python\s+manage\.py\s+([a-z_]+)", text)))


def readme_examples() -> list[str]:
    """The README's code-block lines that run a command: `.venv/bin/python manage.py …`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith(".venv/bin/python manage.py ")
    ]


def test_readme_examples__every_command_line_runs_and_json_parses(checkout: Path) -> None:
    examples = readme_examples()
    assert len(examples) >= 25, "the Command line section's examples are found"
    ran = set()
    for line in examples:
        argv = shlex.split(line)
        done = subprocess.run(
            ["/bin/bash", "-c", line], cwd=checkout, env={}, capture_output=True, text=True,
            timeout=120, start_new_session=True,
        )  # fmt: skip
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if "--json" in argv:
            json.loads(done.stdout)  # one document, nothing else on stdout
        ran.add(argv[2])
    assert {"scheduler", "task", "schedule", "vo", "ce", "pilots", "orchestrate"} <= ran


def test_readme_commands__the_readme_names_the_commands_checked_here() -> None:
    assert {
        "scheduler", "task", "schedule", "vo", "ce", "pilots", "changepassword",
        "create_api_user", "api_token",
    } <= set(readme_commands())  # fmt: skip


def test_env_file__written_once_owner_only_with_a_long_key(checkout: Path) -> None:
    env_file = checkout / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert values["DEBUG"] == "1" and len(values["SECRET_KEY"]) >= 50
    before = env_file.read_text()
    make(checkout, ".env")
    assert env_file.read_text() == before, "a second make keeps the key"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands__help_of_each_runs_without_environment(
    checkout: Path, command: str
) -> None:
    assert "usage:" in ok(manage(checkout, command, "--help"))


@pytest.mark.parametrize(
    "args",
    [
        ("scheduler", "list"),
        ("task", "list"),
        ("task", "requeue", "--help"),
        ("api_token", "list"),
        ("check",),
    ],
)
def test_readme_commands__run_without_environment(checkout: Path, args: Sequence[str]) -> None:
    ok(manage(checkout, *args))


def django_shell(checkout: Path, code: str) -> str:
    return ok(manage(checkout, "shell", "--no-imports", "-c", code)).strip()


def test_readme_commands__changepassword_operator(checkout: Path) -> None:
    password = "Correct-horse-battery-9"
    out = ok(manage(checkout, "changepassword", "operator", stdin=f"{password}\n{password}\n"))
    assert "Password changed successfully for user 'operator'" in out
    check = (
        "from django.contrib.auth.models import User; "
        f"print(User.objects.get(username='operator').check_password({password!r}))"
    )
    assert django_shell(checkout, check) == "True"


def test_env_file__every_process_signs_with_the_same_key(checkout: Path) -> None:
    """What one process signs (a session cookie, say) another one accepts."""
    signing = "from django.core import signing; "
    signed = django_shell(checkout, signing + "print(signing.dumps(42))")
    assert django_shell(checkout, signing + f"print(signing.loads({signed!r}))") == "42"
