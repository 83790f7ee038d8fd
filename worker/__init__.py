"""Widget deployment worker: the domain (settings, tables, S3, services) and the Celery app.

``celery -A worker ...`` finds the application in :mod:`worker.celery`.
"""
