"""Celery tasks: thin wrappers that take IDs and call :mod:`worker.services`."""
