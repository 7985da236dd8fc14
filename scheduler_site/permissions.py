from __future__ import annotations

from typing import Any

from rest_framework.permissions import DjangoModelPermissions
from rest_framework.request import Request


class ModelActionPermissions(DjangoModelPermissions):
    """Django model permissions, reads included (view_*), plus per-action permissions that a
    view declares in `action_permissions` (e.g. pop needs tasks.pop_task)."""

    perms_map = {
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "POST": ["%(app_label)s.add_%(model_name)s"],
        "PUT": ["%(app_label)s.change_%(model_name)s"],
        "PATCH": ["%(app_label)s.change_%(model_name)s"],
        "DELETE": ["%(app_label)s.delete_%(model_name)s"],
    }

    def has_permission(self, request: Request, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        required = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if required is not None:
            return request.user.has_perms(required)
        return super().has_permission(request, view)
