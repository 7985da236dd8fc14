from __future__ import annotations

from django.apps import AppConfig


class PilotsConfig(AppConfig):
    name = "pilots"
    verbose_name = "Pilots"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from pilots.queues import ensure_queues

        post_migrate.connect(ensure_queues, sender=self, dispatch_uid="pilots.ensure_queues")

        # Importing pilots.backends registers the CE backends (the model's choices).
        from pilots import backends, services  # noqa: F401
        from scheduler_site import writers

        # What the models' state-machine methods (ComputeElement.drain(), …) call.
        writers.register(ce_set_status=services.ce_set_status, pilot_mark=services.pilot_mark)
