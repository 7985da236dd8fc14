from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandParser
from rest_framework.authtoken.models import Token

from tasks.roles import OPERATORS, RUNNERS


class Command(BaseCommand):
    help = (
        "Create (or update) an account in the operators or runners role and print its API token. "
        "With --operator-login the account may also log in to the admin, with a generated "
        "password printed once; re-running never prints an existing password again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", choices=["operator", "runner"], default="runner")
        parser.add_argument(
            "--operator-login",
            action="store_true",
            help="Staff + superuser access to the admin with a generated password.",
        )
        parser.add_argument("--quiet-if-exists", action="store_true")

    def handle(
        self,
        *args: Any,
        username: str,
        role: str,
        operator_login: bool,
        quiet_if_exists: bool,
        **_: Any,
    ) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(username=username)
        group = Group.objects.get(name=OPERATORS if role == "operator" else RUNNERS)
        user.groups.add(group)
        token, _ = Token.objects.get_or_create(user=user)
        if created:
            password = None
            if operator_login:
                password = secrets.token_urlsafe(15)
                user.set_password(password)
                user.is_staff = user.is_superuser = True
            else:
                user.set_unusable_password()
            user.save()
            self.stdout.write(self.style.SUCCESS(f"Created {role} account {username!r}."))
            if password:
                self.stdout.write(f"  admin login: {username} / {password}   (shown once)")
            self.stdout.write(f"  API token:   {token.key}")
        elif not quiet_if_exists:
            self.stdout.write(f"Account {username!r} exists; its API token: {token.key}")
            self.stdout.write("  (use `manage.py changepassword` to set a new admin password)")
        else:
            self.stdout.write(f"Account {username!r} exists (password not shown again).")
