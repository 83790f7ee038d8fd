"""``/``: what this server is and where to read more (public, like ``/health`` and ``/docs``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(tags=["health"])


class Index(BaseModel):
    name: str
    docs: str
    openapi: str
    health: str
    sessions: str


@router.get("/", summary="What this server is, and links to its documentation")
def index() -> Index:
    return Index(
        name="Widget deployment API",
        docs="/docs",
        openapi="/openapi.json",
        health="/health",
        sessions="/sessions",
    )
