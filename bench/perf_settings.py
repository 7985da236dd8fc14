"""The production settings plus bench-only URLs (bench/perf_urls.py): what bench/perf_http.py
serves with gunicorn. Never used by the product."""

from __future__ import annotations

from scheduler_site.settings import *  # noqa: F403

ROOT_URLCONF = "bench.perf_urls"
