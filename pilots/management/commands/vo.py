from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from pilots import services
from pilots.models import VirtualOrganisation
from pilots.serializers import VOSerializer
from tasks.management.commands._base import SubcommandCommand, fields_table, table
from tasks.management.commands._fields import (
    add_field_options,
    field_values,
    require_some,
    validated,
    writable,
)

NAME = {"name": "NAME"}


class Command(SubcommandCommand):
    help = (
        "Virtual Organisations (pilots are submitted per VO): list, show, create, update. "
        "Options are the API's fields (/api/vos/). `manage.py vo ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        self.action(sub, "list", "VOs, by name.")
        fields = writable(VOSerializer, exclude=["name"])
        for name, text, extra in [
            ("show", "One VO.", None),
            ("create", "Create a VO (its pilot cycles start with the next beat tick).", False),
            ("update", "Change a VO (--enabled no stops its pilot cycles).", True),
        ]:
            cmd = self.action(sub, name, text)
            cmd.add_argument("name", metavar="NAME", help="The VO's name, e.g. lhcb.")
            if extra is not None:
                add_field_options(cmd, VOSerializer, fields, updating=extra)

    def _get(self, name: str) -> VirtualOrganisation:
        vo = VirtualOrganisation.objects.filter(name=name).first()
        if vo is None:
            raise CommandError(f"VO {name!r} does not exist.")
        return vo

    def _list(self, **_: Any) -> None:
        rows = VOSerializer(VirtualOrganisation.objects.order_by("name"), many=True).data
        columns = ["name", "enabled", "created_at"]
        self.result(rows, lambda: table(columns, ([r[c] for c in columns] for r in rows)))

    def _show(self, *, name: str, **_: Any) -> None:
        record = VOSerializer(self._get(name)).data
        self.result(record, lambda: fields_table(record))

    def _create(self, *, name: str, **options: Any) -> None:
        fields = writable(VOSerializer, exclude=["name"])
        body = {"name": name, **field_values(options, VOSerializer, fields)}
        vo = services.vo_create(**validated(VOSerializer, body, labels=NAME))
        self.result(VOSerializer(vo).data, f"created VO {vo.name}")

    def _update(self, *, name: str, **options: Any) -> None:
        vo = self._get(name)
        fields = writable(VOSerializer, exclude=["name"])
        body = field_values(options, VOSerializer, fields)
        require_some(body, fields)
        changes = validated(VOSerializer, body, instance=vo, labels=NAME)
        vo = services.vo_update(vo=vo, **changes)
        self.result(VOSerializer(vo).data, f"updated VO {vo.name}")
