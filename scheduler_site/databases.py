"""DATABASE_URL parsing: SQLite (embedded default) or PostgreSQL (production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

SUPPORTED_ENGINES = {
    "django.db.backends.sqlite3",
    "django.db.backends.postgresql",
}


def sqlite_config(path: Path, *, test_path: Path) -> dict[str, Any]:
    # SQLite has no SKIP LOCKED and Django ignores select_for_update() there. IMMEDIATE makes
    # every atomic block take the write lock at BEGIN, so the pop's read-then-update cannot
    # interleave with another writer; WAL lets readers go on meanwhile, and the busy timeout
    # makes writers wait their turn instead of failing with "database is locked".
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;"
            ),
        },
        "TEST": {"NAME": str(test_path)},
    }


def database_from_url(url: str, *, default_sqlite: Path) -> dict[str, Any]:
    if not url:
        return sqlite_config(default_sqlite, test_path=default_sqlite.with_name("test.sqlite3"))
    try:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
    except (ValueError, KeyError) as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
    engine = config.get("ENGINE", "")
    if engine not in SUPPORTED_ENGINES:
        raise ImproperlyConfigured(
            f"DATABASE_URL uses an unsupported engine {engine!r}; use sqlite:/// or postgres://."
        )
    if engine == "django.db.backends.sqlite3":
        path = Path(config["NAME"])
        return sqlite_config(path, test_path=path.with_name(f"test_{path.name}"))
    return config
