"""Identifiers that may end up in S3 keys, validated before they get anywhere near one."""

from __future__ import annotations

import re
import uuid

MAX_ID_LENGTH = 64
_SAFE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_ID_LENGTH - 1}}}")


class UnsafeIdentifierError(ValueError):
    """An ID that is not a plain token: slashes, dots, control characters, too long, empty."""


def is_safe_id(value: object) -> bool:
    return isinstance(value, str) and _SAFE_ID.fullmatch(value) is not None


def require_safe_id(value: object, field: str) -> str:
    if not is_safe_id(value):
        raise UnsafeIdentifierError(
            f"{field} must be 1-{MAX_ID_LENGTH} characters of letters, digits, '-' or '_'"
        )
    assert isinstance(value, str)
    return value


def new_id() -> str:
    return str(uuid.uuid4())
