"""Plain business functions the Celery tasks call; no Celery imports here."""
