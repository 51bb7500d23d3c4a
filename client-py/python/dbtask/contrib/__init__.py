"""Integrations of dbtask with frameworks: ``dbtask.contrib.fastapi`` (FastAPI, Starlette)."""
