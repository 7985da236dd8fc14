from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from tasks import accounts
from tasks.management.commands._base import OurCommand


class Command(OurCommand):
    help = (
        "Create (or update) an account in the operators or runners role. A new account's API "
        "token is printed once (only its digest is stored; `manage.py api_token` issues, lists "
        "and revokes tokens). With --operator-login the account may also log in to the admin, "
        "with a generated password printed once; re-running never prints a password or token "
        "again. --scheduler limits a runner to those queues: it then sees, pops and reports "
        "only them; re-running sets the list anew (without --scheduler: every queue)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", metavar="USERNAME", help="The account's name.")
        parser.add_argument(
            "--role",
            choices=["operator", "runner"],
            default="runner",
            help="operator: manages everything; runner: pops and reports tasks.",
        )
        parser.add_argument(
            "--scheduler",
            action="append",
            default=[],
            metavar="ID",
            help="Limit a runner to this queue; repeat for several.",
        )
        parser.add_argument(
            "--operator-login",
            action="store_true",
            help="Staff + superuser access to the admin with a generated password.",
        )
        parser.add_argument(
            "--expires-in",
            metavar="DURATION",
            help="The new account's token expires after this (90d, 12h, 30m); default: never.",
        )
        parser.add_argument(
            "--quiet-if-exists",
            action="store_true",
            help="An existing account is not an error and gets a one-line note.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON document (username, role, created, and a new account's "
            "token and password).",
        )

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        expires_in = options["expires_in"] and accounts.parse_expires_in(options["expires_in"])
        account = accounts.account_set_up(
            username=username,
            role=options["role"],
            scheduler_ids=options["scheduler"],
            operator_login=options["operator_login"],
            expires_in=expires_in or None,
        )
        if self.as_json:
            self.result(
                {
                    "username": username,
                    "role": options["role"],
                    "created": account.created,
                    "queues": sorted(options["scheduler"]),
                    "token": account.token,
                    "password": account.password,
                }
            )
        elif account.created:
            self._created(account, role=options["role"], scopes=options["scheduler"])
        elif options["quiet_if_exists"]:
            self.stdout.write(f"Account {username!r} exists (password and token not shown again).")
        else:
            self.stdout.write(f"Account {username!r} exists; updated its role and queues.")
            self.stdout.write(
                "  Its token and password are not shown again: `manage.py api_token create "
                f"{username}` issues a new token, `manage.py changepassword {username}` sets a "
                "new password."
            )

    def _created(self, account: accounts.Account, *, role: str, scopes: list[str]) -> None:
        name = account.user.get_username()
        self.stdout.write(self.style.SUCCESS(f"Created {role} account {name!r}."))
        if scopes:
            self.stdout.write(f"  queues:      {', '.join(sorted(scopes))} only")
        if account.password:
            self.stdout.write(f"  admin login: {name} / {account.password}   (shown once)")
        self.stdout.write(f"  API token:   {account.token}   (shown once)")
