"""The production settings, run with DEBUG off, with only what a test run needs changed.

Values go into os.environ (not just this module) so that the processes tests start (a Celery
worker, a live server, concurrent poppers) read the same configuration.
"""

from __future__ import annotations

import os
import secrets

# Never the checkout's .env (`make run`'s DEBUG=1 and key): a test run is the production
# configuration with the changes below, whoever ran `make run` here before.
os.environ["SCHEDULER_ENV_FILE"] = ""
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1,localhost")
for name in ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"):
    os.environ.setdefault(name, "0")
os.environ.setdefault("SECURE_HSTS_SECONDS", "0")
os.environ.setdefault("WORKER_HEARTBEAT_SECONDS", "1")
os.environ.setdefault("LOCK_WAIT_MAX_SECONDS", "2")
# Permission matrices send hundreds of anonymous requests; the throttle test sets its own rate.
os.environ.setdefault("API_THROTTLE_ANON", "100000/min")
# The broker of the worker end-to-end tests: beside PostgreSQL, RabbitMQ when
# scripts/with-rabbitmq.sh runs (TEST_RABBITMQ_URL, the third leg), else Redis
# (TEST_REDIS_URL, scripts/with-redis.sh); the filesystem transport beside SQLite, in a folder
# of this run's own.
if os.environ.get("DATABASE_URL", "").startswith("postgres"):
    _broker = os.environ.get("TEST_RABBITMQ_URL") or os.environ.get("TEST_REDIS_URL")
    if _broker:
        os.environ.setdefault("CELERY_BROKER_URL", _broker)
os.environ.setdefault("SCHEDULER_BROKER_DIR", f"/tmp/scheduler-test-broker-{os.getpid()}")

from scheduler_site.settings import *  # noqa: E402, F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only

# One SQLite test database per test run, so parallel runs on one machine do not share a file;
# through the environment, so the processes a test starts open the same one.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    os.environ.setdefault("SCHEDULER_TEST_SQLITE", str(VAR_DIR / f"test-{os.getpid()}.sqlite3"))  # noqa: F405
    DATABASES["default"]["TEST"]["NAME"] = os.environ["SCHEDULER_TEST_SQLITE"]  # noqa: F405

# Tests render pages without running collectstatic first.
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# whitenoise warns at every request when STATIC_ROOT is missing (collectstatic is a deploy step).
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405
