"""Request and response bodies of the HTTP API (pydantic; the tables live in worker.models)."""
