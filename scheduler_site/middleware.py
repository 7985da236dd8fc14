"""The middleware of this project's own: lighter work for the API's requests."""

from __future__ import annotations

from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.http import HttpRequest

API_PREFIX = "/api/"


class MessageMiddleware(DjangoMessageMiddleware):
    """Django's messages (the notices the admin shows after an action) for every page but the
    API's: no API view adds or shows a message, and setting up the storage (its cookie and
    session backends) was the costliest middleware step of an API request. It enforces
    nothing, so skipping it weakens nothing; a message added during an API request is refused
    as for any request without the middleware (MessageFailure)."""

    def process_request(self, request: HttpRequest) -> None:
        if not request.path_info.startswith(API_PREFIX):
            super().process_request(request)
