"""What every app's REST views share: who is asking, the error response of the schema, and
the path pattern of UUID lookups."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework.request import Request

# Only strings uuid.UUID() accepts (32 hex digits, dashes optional): anything else is a 404
# from the router, never a ValueError in the view.
UUID_PATTERN = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"

ERROR = OpenApiResponse(description="Error: {'detail': ...} or field errors.")


def actor(request: Request) -> str:
    """The name the services record as the actor of a change."""
    return getattr(request.user, "username", "") or "anonymous"
