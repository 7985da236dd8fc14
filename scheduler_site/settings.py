"""Settings, all of which production takes from the environment (see README, "Environment")."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from scheduler_site.databases import database_from_url
from scheduler_site.env import (
    check_secret_key,
    env_bool,
    env_commands,
    env_file_path,
    env_int,
    env_list,
    env_rate,
    env_str,
    load_env_file,
)

BASE_DIR = Path(__file__).resolve().parent.parent
# The local env file `make run` writes (DEBUG=1, a generated SECRET_KEY); the real environment
# takes precedence. A production host has no such file.
ENV_FILE = env_file_path(BASE_DIR / ".env")
load_env_file(ENV_FILE)
VAR_DIR = Path(env_str("SCHEDULER_VAR_DIR") or BASE_DIR / "var")

DEBUG = env_bool("DEBUG", default=False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (`make run` writes one to .env)."
        )
    # DEBUG without a key (no .env): a key of this process only, so nothing signed with a
    # known key; sessions then do not survive a restart.
    SECRET_KEY = secrets.token_urlsafe(50)
elif not DEBUG:
    check_secret_key(SECRET_KEY)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when DEBUG is off.")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "scheduler_site.apps.SchedulerAdminConfig",  # django.contrib.admin, our section order
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # Hashed API tokens, shown once, revocable, optional expiry (`manage.py api_token`).
    "knox",
    # Locks out repeated failed admin logins.
    "axes",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "django_tasks",
    "tasks",
    "schedules",
    "pilots",
    # An ordinary app with plain Celery tasks and Django Tasks functions: the demo's and the
    # end-to-end tests' "bring your own work" (README, docs/migration.md).
    "demo_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and API docs' static files from gunicorn, compressed and cached.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Django's messages (the admin's notices), not set up for /api/, which never shows any.
    "scheduler_site.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: it refuses a locked-out login before any password is checked. It needs
# the request, which every login path here passes (the admin's login form).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "scheduler_site.urls"
WSGI_APPLICATION = "scheduler_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL"), default_sqlite=VAR_DIR / "scheduler.sqlite3"
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# The dashboard's own script and style, and uPlot vendored from the npm registry (no CDN).
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
LOGIN_URL = "admin:login"

# Admin login lockout: this many failures for one username from one address lock that pair
# out for the cool-off (a success before then resets the count). Per pair, so nobody can lock
# an operator out from elsewhere; behind a proxy every login comes from the proxy's address
# and the lockout is then per username. `manage.py axes_reset` lifts every lockout.
AXES_FAILURE_LIMIT = env_int("ADMIN_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("ADMIN_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True

# API tokens (django-rest-knox): stored as SHA-512 digests; no expiry unless one is given at
# creation (knox's own default is 10 hours, which would stop every runner overnight).
REST_KNOX = {
    "TOKEN_TTL": None,
    "AUTH_HEADER_PREFIX": "Token",
    "AUTO_REFRESH": False,
}

# Production hardening: on unless DEBUG, overridable for a TLS-terminating proxy setup.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_TLS_PROXY", default=False) else None
)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "scheduler_site.permissions.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["scheduler_site.permissions.ModelActionPermissions"],
    # The API takes JSON only: a JSON field (a task's data) cannot be sent as a form field.
    # Nested at most 64 deep: deeper, Python's decoder ran out of stack (a 500).
    "DEFAULT_PARSER_CLASSES": ["scheduler_site.api_input.JSONParser"],
    # DRF's, with the common Accept headers answered without parsing them.
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "scheduler_site.api_input.ContentNegotiation",
    # Strict query parameters: a bad or empty filter, limit or offset is a 400, not ignored.
    "DEFAULT_FILTER_BACKENDS": ["scheduler_site.api_input.FilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "scheduler_site.schema.AutoSchema",
    "EXCEPTION_HANDLER": "scheduler_site.api_errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "scheduler_site.api_input.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "scheduler_site.throttles.UserRateThrottle",
    ],
    # Per process (local-memory cache): with N web processes the effective limit is N times.
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_rate("API_THROTTLE_ANON", "60/min"),
        "user": env_rate("API_THROTTLE_USER", "20000/min"),
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Scheduler API",
    "DESCRIPTION": "Schedules, prioritised task queues, pilots. See the README for concepts.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Operations tagged by resource (the path's first part after /api/), so Swagger groups
    # them: schedulers, tasks, schedules, vos, compute-elements, pilots, workers, health.
    "SCHEMA_PATH_PREFIX": r"/api/",
    "TAGS": [
        {"name": "schedulers", "description": "Queues: create, pause, push, pop."},
        {"name": "tasks", "description": "Tasks: reports, heartbeats, cancel, requeue, charts."},
        {"name": "schedules", "description": "Schedules: cron, interval or one-off templates."},
        {"name": "vos", "description": "Virtual organisations (pilots)."},
        {"name": "compute-elements", "description": "Compute Elements: drain, ban, submit."},
        {"name": "pilots", "description": "Pilot submissions and their summary."},
        {"name": "workers", "description": "Celery workers, pull runners and beat."},
        {"name": "health", "description": "Each component ok, degraded or down."},
    ],
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["scheduler_site.permissions.Authenticated"],
    # Served from the installed sidecar package: the docs work with no internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several resources have a `status`, each with its own choices: name each enum.
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "tasks.models.TaskStatus",
        "ReportedStatusEnum": ["RUNNING", "COMPLETED", "FAILED"],
        "ScheduleStatusEnum": "schedules.models.ScheduleStatus",
        "ComputeElementStatusEnum": "pilots.models.CEStatus",
        "PilotStatusEnum": "pilots.models.PilotStatus",
        "SchedulerKindEnum": "tasks.models.SchedulerKind",
        "WorkerKindEnum": "tasks.models.WorkerKind",
        "HealthStatusEnum": ["ok", "degraded", "down"],
    },
}

# Queue behaviour.
TASK_DEFAULT_LEASE_SECONDS = env_int("TASK_DEFAULT_LEASE_SECONDS", 300, minimum=1)
# A task dispatched to the broker that no worker claims within this long is handed back and
# sent again (its message was lost, e.g. by a broker restart); a duplicate is harmless.
TASK_CLAIM_TIMEOUT_SECONDS = env_int("TASK_CLAIM_TIMEOUT_SECONDS", 15, minimum=1)
TASK_POP_MAX_LIMIT = 1000
# The longest a pop may wait for work (`wait`): a waiting request holds a web thread and a
# database connection meanwhile.
TASK_POP_MAX_WAIT_SECONDS = 30
TASK_RETENTION_DAYS = env_int("TASK_RETENTION_DAYS", 7, minimum=1)
TASK_DEAD_RETENTION_DAYS = env_int("TASK_DEAD_RETENTION_DAYS", 30, minimum=1)
ORCHESTRATOR_TICK_SECONDS = env_int("ORCHESTRATOR_TICK_SECONDS", 5, minimum=1)
REAPER_INTERVAL_SECONDS = env_int("REAPER_INTERVAL_SECONDS", 15, minimum=1)
DISPATCH_INTERVAL_SECONDS = env_int("DISPATCH_INTERVAL_SECONDS", 2, minimum=1)
# A worker extends a running task's lease (and its locks) by 3x this, every this many seconds:
# a killed worker's task is reaped within about 3x this plus the reaper's interval.
WORKER_HEARTBEAT_SECONDS = env_int("WORKER_HEARTBEAT_SECONDS", 10, minimum=1)
# A dispatch round sends its tasks as messages of up to DISPATCH_MESSAGE_BATCH tasks each
# (`tasks.run_tasks`, run one after the other), in never fewer messages than
# DISPATCH_MESSAGE_SPREAD (or than tasks), so a round still spreads over that many worker
# processes: a Celery message costs a worker about what a no-op task's claim and report do
# (issue 12). 1: one `tasks.run_task` message a task. Handlers with time limits always get one.
DISPATCH_MESSAGE_BATCH = env_int("DISPATCH_MESSAGE_BATCH", 8, minimum=1)
DISPATCH_MESSAGE_SPREAD = env_int("DISPATCH_MESSAGE_SPREAD", 4, minimum=1)
# A batch that has run this long sends the tasks it has not started yet again, one message
# each, for any free worker: a batch's tail waits behind its head at most this long plus one
# task, and a warm shutdown waits as long for the batch in hand. 0: after its first task.
WORKER_BATCH_MILLISECONDS = env_int("WORKER_BATCH_MILLISECONDS", 500, minimum=0)
# In a batch, a successful report and the claim of the batch's next task are one statement
# on PostgreSQL (both fenced, both with their events; a next task another transaction holds
# is claimed on its own: tasks.queue.worker._complete_start_sql). Off by default: the
# end-to-end suites run the two statements.
WORKER_CLAIM_WITH_REPORT = env_bool("WORKER_CLAIM_WITH_REPORT", False)
# A worker's claim (DISPATCHED -> RUNNING) commits without waiting for its WAL flush on
# PostgreSQL; a database crash may lose a claim, and the task then runs again
# (tasks.queue.worker.start_dispatched). 0: every claim waits for its flush.
WORKER_CLAIM_ASYNC_COMMIT = env_bool("WORKER_CLAIM_ASYNC_COMMIT", False)
# A pull runner counts as live this long after its last call (it idles in long-poll pops and
# between polls); its calls are recorded at most once per RUNNER_SEEN_WRITE_SECONDS each.
RUNNER_LOST_AFTER_SECONDS = env_int("RUNNER_LOST_AFTER_SECONDS", 90, minimum=1)
RUNNER_SEEN_WRITE_SECONDS = 5
# A task whose lock is held waits 0.5 s, then twice as long each time, up to this.
LOCK_WAIT_MAX_SECONDS = env_int("LOCK_WAIT_MAX_SECONDS", 10, minimum=1)
# Pilots: a pilot with no news from its CE for this long is FAILED ("lost").
PILOT_LOST_AFTER_SECONDS = env_int("PILOT_LOST_AFTER_SECONDS", 900, minimum=1)
PILOT_SIMULATION_SEED = env_str("PILOT_SIMULATION_SEED", "scheduler")
# The only commands the `local` backend runs, by name: a CE's backend_settings names one and
# never carries a command itself, so an API token never means running code here (DESIGN §9.2).
PILOT_LOCAL_COMMANDS = env_commands("PILOT_LOCAL_COMMANDS", {"sleep": ["sleep", "5"]})

# Celery: the embedded default is kombu's filesystem transport, one folder for in and out.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
if not CELERY_BROKER_URL.startswith(
    ("filesystem://", "redis://", "rediss://", "amqp://", "pyamqp://")
):
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL must start with filesystem://, redis://, rediss://, amqp:// or pyamqp://."
    )
CELERY_BROKER_DIR = Path(env_str("SCHEDULER_BROKER_DIR") or VAR_DIR / "broker")
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR),
        "data_folder_out": str(CELERY_BROKER_DIR),
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "polling_interval": 0.1,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
# django-celery-beat's DatabaseScheduler behind a database lease: beat may run on every host,
# one sends at a time, another takes over within about 1.3 leases when it dies.
CELERY_BEAT_SCHEDULER = "scheduler_site.beat:LeasedDatabaseScheduler"
BEAT_LEASE_SECONDS = env_int("BEAT_LEASE_SECONDS", 15, minimum=3)
# Queues. Celery's default queue ("celery", tasks.models.DEFAULT_CELERY_QUEUE) is where every
# celery-kind scheduler sends unless its `celery_queue` says otherwise; the system's own
# periodic jobs (tick, dispatcher, reaper, pruning, pilot cycles) have a queue of their own, so
# a backlog of handlers never delays them. A worker started without -Q consumes both.
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_SYSTEM_QUEUE = env_str("CELERY_SYSTEM_QUEUE", "system")
if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}", CELERY_SYSTEM_QUEUE):
    raise ImproperlyConfigured(
        "CELERY_SYSTEM_QUEUE must be 1-100 letters, digits, '-', '_', '.' or ':'."
    )
# Each queue with a direct exchange of its own name: what Celery declares for a queue it
# creates on demand (a scheduler's celery_queue, a worker's -Q), so all declarations agree.
CELERY_TASK_QUEUES = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name)
    for name in dict.fromkeys([CELERY_TASK_DEFAULT_QUEUE, CELERY_SYSTEM_QUEUE])
)
CELERY_TASK_ROUTES = ("scheduler_site.periodic.route_system_jobs",)
# Celery's Django fixup closes the database connection around every task unless this is set:
# a new PostgreSQL backend per task, half the CPU of a no-op task. Keep connections; the
# task_prerun hook in scheduler_site.celery still drops old or failed ones.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000, minimum=0)

# Django Tasks (the django-tasks backport on Django 5.2, django.tasks on 6): `.enqueue()` of a
# @task function queues it here, on the scheduler named by its queue_name (made on first use).
TASKS = {
    "default": {
        "BACKEND": "tasks.django_tasks.SchedulerBackend",
        "QUEUES": [],  # any queue name
        "OPTIONS": {"CREATE_SCHEDULERS": True, "ENQUEUE_ON_COMMIT": True},
    }
}

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(f"LOG_LEVEL={LOG_LEVEL!r} is not a logging level.")
# plain: one line of text per record. json: one JSON object per line, with the task id,
# scheduler and attempt of the task being run (scheduler_site.log_context).
LOG_FORMAT = env_str("LOG_FORMAT", "plain").lower()
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use plain or json.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "scheduler_site.log_context.json_formatter"},
    },
    "filters": {"context": {"()": "scheduler_site.log_context.ContextFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        app: {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False}
        for app in ("tasks", "schedules", "pilots", "scheduler_site")
    }
    # kombu warns on every filesystem-broker connection that it has no hostname.
    | {"kombu.connection": {"level": "ERROR"}},
}
