"""gunicorn bench.plain_wsgi: the product's settings with bench/plain_views.py's URLs."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
application = get_wsgi_application()
settings.ROOT_URLCONF = "bench.plain_views"  # after setup: the URL resolver reads it per request
