"""Settings of the example project: one app (shop), SQLite, and dbtask (docs/django.md)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
ROOT_URLCONF = "djproject.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "dbtask.contrib.django",  # connects the client with the DBTASK_* settings below
    "shop",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # The web process and the worker must share it: one file, given by the environment
        # in the tests.
        "NAME": os.environ.get("EXAMPLE_DB", BASE_DIR / "db.sqlite3"),
    }
}

# dbtask: the keywords of dbtask.init as DBTASK_* settings. Unset ones fall back to the
# environment variables of the same name (the tests set DBTASK_NATS_URL and DBTASK_REDIS_URL).
DBTASK_TIMEOUT = 5.0

# Django 6's Tasks framework: @django.tasks.task functions run on dbtask workers. Django 5.2
# ignores this setting.
TASKS = {
    "default": {
        "BACKEND": "dbtask.contrib.django.tasks_backend.DbtaskBackend",
        "QUEUES": ["default", "reports"],
    }
}
