"""docs/architecture.md and the README's Layout name real files and functions: a rename that
leaves them pointing at nothing fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tasks/api.py` `SchedulerViewSet.push`: a path, then the name of something defined in it
# (a function, a class and its method, or a module-level name).
_REFERENCE = re.compile(r"`([a-z_]+(?:/[a-z_]+)*\.py)`(?: `([A-Za-z_][\w.]*)`)?")


def _references(doc: str) -> list[tuple[str, str | None]]:
    return _REFERENCE.findall((ROOT / doc).read_text())


def _defined(path: Path, dotted: str) -> bool:
    source = path.read_text()
    return all(
        re.search(rf"^\s*(?:def|class) {name}\b|^{name}\b[^=\n]*=", source, re.M)
        for name in dotted.split(".")
    )


def test_architecture_doc__every_path_and_function_it_names_exists() -> None:
    missing = []
    for path, name in _references("docs/architecture.md"):
        if not (ROOT / path).is_file():
            missing.append(path)
        elif name and not _defined(ROOT / path, name):
            missing.append(f"{path} {name}")

    assert missing == []
    assert len(_references("docs/architecture.md")) > 40


def test_readme_layout__every_module_it_lists_exists() -> None:
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    app_tables = re.findall(r"^`(\w+)/` — (.*?)(?=^`\w+/` —|^Elsewhere|\Z)", layout, re.M | re.S)
    listed = [
        (app, module) for app, text in app_tables for module in re.findall(r"`(\w+\.py)`", text)
    ]
    missing = [f"{app}/{module}" for app, module in listed if not (ROOT / app / module).is_file()]

    assert missing == []
    assert {app for app, _ in listed} >= {"tasks", "schedules", "pilots", "scheduler_site"}
