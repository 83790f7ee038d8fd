"""The benchmark's own S3 client: one aiobotocore client, configured like the worker's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from worker.settings import get_settings


@contextlib.asynccontextmanager
async def s3_client(max_pool_connections: int = 64) -> AsyncIterator[Any]:
    """Same endpoint, retries, timeouts and addressing as :class:`worker.s3.S3Store`; a larger
    connection pool so that 32 requests can really be in flight at once."""
    settings = get_settings()
    config = AioConfig(
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        s3={"addressing_style": "path"},
        max_pool_connections=max_pool_connections,
    )
    assert settings.aws_access_key_id and settings.aws_secret_access_key
    creator = get_session().create_client(
        "s3",
        region_name=settings.aws_region,
        endpoint_url=str(settings.s3_endpoint_url),
        config=config,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
    )
    async with creator as client:
        yield client


async def get_object_or_none(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        obj = await client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    async with obj["Body"] as stream:
        data: bytes = await stream.read()
    return data
