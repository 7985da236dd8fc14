"""A gunicorn application that profiles another one with cProfile: where a real worker's CPU
per request goes (issue 12). `BENCH_PROFILE_APP` names the module to wrap (scheduler_site.wsgi
or bench.plain_wsgi), `BENCH_PROFILE_DIR` where each worker writes its stats: one pstats file
per endpoint (method and path with the ids taken out) and pid, rewritten every 200 requests of
that endpoint and at exit. Used by `BENCH_PROFILE_DIR=… python -m bench.pop_bench`; bench only,
never the product's."""

from __future__ import annotations

import atexit
import cProfile
import importlib
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_APP = os.environ["BENCH_PROFILE_APP"]
_target = importlib.import_module(_APP).application
_out = Path(os.environ["BENCH_PROFILE_DIR"])
_ID = re.compile(r"/[0-9a-f-]{32,36}/|/bench-[^/]+/")
_profiles: dict[str, tuple[cProfile.Profile, list[int]]] = {}


def _file(kind: str) -> Path:
    return _out / f"{_APP}.{kind}.{os.getpid()}.pstats"


def _dump_all() -> None:
    for kind, (profile, _count) in _profiles.items():
        profile.dump_stats(_file(kind))


atexit.register(_dump_all)


def _profile_of(environ: dict[str, Any]) -> tuple[str, cProfile.Profile, list[int]]:
    path = _ID.sub("/ID/", environ.get("PATH_INFO", ""))
    kind = re.sub(r"[^A-Za-z0-9]+", "_", f"{environ.get('REQUEST_METHOD')} {path}").strip("_")
    if kind not in _profiles:
        # CPU time, not wall time: the worker's waits on PostgreSQL are not its cost.
        _profiles[kind] = (cProfile.Profile(time.process_time), [0])
    return (kind, *_profiles[kind])


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    kind, profile, count = _profile_of(environ)
    profile.enable()
    try:
        # The body is built inside: Django's responses are lists, so nothing runs later.
        return list(_target(environ, start_response))
    finally:
        profile.disable()
        count[0] += 1
        if count[0] % 200 == 0:
            profile.dump_stats(_file(kind))
