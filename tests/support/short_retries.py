"""``celery -A tests.support.short_retries worker``: the project's Celery app with the deploy
task's retry budget cut to ``TEST_MAX_RETRIES`` Celery retries (default 2), so that a test sees
in seconds what production shows after minutes: a job whose S3 outage outlasts every retry.

The budget is code, not configuration (:data:`worker.constants.MAX_RETRIES`, applied through
``autoretry_for`` in :mod:`worker.tasks.base`); Celery reads ``max_retries`` from the task when
it retries, so setting it on the registered task is enough. The backoff is unchanged (2 s, then
4 s..., full jitter): with 2 retries the countdowns add up to at most 6 s.
"""

from __future__ import annotations

import os

import worker.tasks.deploy  # noqa: F401 - registers widgets.deploy before the registry is read
from worker import constants as c
from worker.celery import app

MAX_RETRIES = int(os.environ.get("TEST_MAX_RETRIES", "2"))

app.tasks[c.DEPLOY_TASK].max_retries = MAX_RETRIES

__all__ = ["MAX_RETRIES", "app"]
