"""Integrations of dbtask with frameworks: ``dbtask.contrib.fastapi`` (FastAPI, Starlette) and
``dbtask.contrib.django`` (Django: settings, app, ``delay_on_commit``, the worker's
``--django``, and Django 6's Tasks backend)."""
