"""One mapping from domain errors to HTTP answers, so no view handles them by hand."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from tasks.exceptions import QueueError

logger = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, QueueError):
        return Response(exc.payload(), status=exc.http_status)
    if isinstance(exc, DjangoValidationError):
        detail = (
            exc.message_dict if hasattr(exc, "error_dict") else {"detail": " ".join(exc.messages)}
        )
        return Response(detail, status=400)
    if isinstance(exc, RequestDataTooBig):
        # Django's own answer is an HTML 400 page; the API answers JSON, naming the limit.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response({"detail": f"The request body is larger than {limit} bytes."}, 400)
    if isinstance(exc, DataError):
        # A value the database cannot hold (an out-of-range integer, say) is bad input.
        logger.info("bad input refused by the database: %s", exc)
        # The database's own message quotes the SQL: logged, not answered.
        return Response({"detail": "A value is out of range for the database."}, 400)
    return drf_exception_handler(exc, context)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """A URL no route matches (under /api/, an id of the wrong shape): JSON like every other
    API answer, the usual page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)
