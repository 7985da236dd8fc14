from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from scheduler_site import tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
# Before the application loads its middleware: Django's instrumentation adds its own.
tracing.setup("web")
application = get_wsgi_application()
