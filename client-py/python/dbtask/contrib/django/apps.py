"""The Django app of dbtask: ``INSTALLED_APPS = [..., "dbtask.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class DbtaskConfig(AppConfig):
    name = "dbtask.contrib.django"
    label = "dbtask"
    verbose_name = "dbtask"

    def ready(self) -> None:
        from . import install

        install()
