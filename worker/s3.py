"""S3 access for worker processes: one event loop and one aiobotocore client per process.

The client is created lazily in the process that uses it (and eagerly at ``worker_process_init``),
never inherited across fork, and reused for every task. Short blips (500/503, throttling, dropped
connections) are retried inside botocore with its ``standard`` retry mode (exponential backoff with
jitter); what is still failing after that surfaces as :class:`TransientS3Error` for Celery to retry
later, while errors no retry can fix surface as :class:`PermanentS3Error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from worker.constants import TASK_SOFT_TIME_LIMIT
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Error codes no amount of retrying fixes: fail the job at once instead of a retry storm.
PERMANENT_ERROR_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "AccountProblem",
        "InvalidArgument",
        "MalformedXML",
    }
)


# Every S3 call, botocore's own retries included, ends well before the task's soft time limit.
S3_CALL_BUDGET_SECONDS = TASK_SOFT_TIME_LIMIT - 15

# Codes S3 sends with a 4xx status that are still worth retrying.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "OperationAborted",
        "ExpiredToken",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
    }
)
# Client-side errors no retry can fix.
PERMANENT_CLIENT_ERRORS = (
    NoCredentialsError,
    PartialCredentialsError,
    ParamValidationError,
    NoRegionError,
)


class S3Error(Exception):
    """Base of the two S3 failure kinds; the message is readable on its own."""


class TransientS3Error(S3Error):
    """Worth retrying later: the service or the network is having a bad moment."""


class PermanentS3Error(S3Error):
    """Retrying will not help: wrong bucket, wrong credentials, invalid request."""


def classify(exc: Exception, action: str) -> S3Error:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"S3 {action} failed: {code} (HTTP {status}): {err.get('Message', '')}".strip()
        if code in TRANSIENT_ERROR_CODES:
            return TransientS3Error(message)
        if code in PERMANENT_ERROR_CODES or (400 <= status < 500 and status not in (408, 429)):
            return PermanentS3Error(message)
        return TransientS3Error(message)
    message = f"S3 {action} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, PERMANENT_CLIENT_ERRORS):
        return PermanentS3Error(message)
    return TransientS3Error(message)


class S3Store:
    """A bucket, through one long-lived aiobotocore client driven by this object's event loop."""

    clients_created = 0  # per process; the worker tests check it stays at one

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.cache_control = settings.s3_cache_control
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        config = AioConfig(
            retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            s3={"addressing_style": "path"},
        )
        creds: dict[str, Any] = {}
        if settings.aws_access_key_id and settings.aws_secret_access_key:
            creds = {
                "aws_access_key_id": settings.aws_access_key_id.get_secret_value(),
                "aws_secret_access_key": settings.aws_secret_access_key.get_secret_value(),
            }
        creator = get_session().create_client(
            "s3",
            region_name=settings.aws_region,
            endpoint_url=str(settings.s3_endpoint_url) if settings.s3_endpoint_url else None,
            config=config,
            **creds,
        )
        self._client = self._loop.run_until_complete(self._stack.enter_async_context(creator))
        type(self).clients_created += 1

    def _run(self, coro: Coroutine[Any, Any, T], action: str) -> T:
        """Run one S3 call to completion, within :data:`S3_CALL_BUDGET_SECONDS`.

        If anything interrupts it (Celery's soft time limit is raised *inside*
        ``run_until_complete``), the call is cancelled and drained before re-raising: a request
        left pending in this long-lived loop would otherwise be resumed by the next S3 call of
        the process, and could upload an old snapshot after a newer one.
        """
        with self._lock:
            task = self._loop.create_task(asyncio.wait_for(coro, S3_CALL_BUDGET_SECONDS))
            try:
                return self._loop.run_until_complete(task)
            except (ClientError, BotoCoreError) as exc:
                raise classify(exc, action) from exc
            except TimeoutError as exc:
                raise TransientS3Error(
                    f"S3 {action} failed: no answer within {S3_CALL_BUDGET_SECONDS}s"
                ) from exc
            finally:
                if not task.done():
                    task.cancel()
                    self._loop.run_until_complete(asyncio.gather(task, return_exceptions=True))

    def put_json(self, key: str, body: bytes, *, metadata: dict[str, str]) -> None:
        self._run(
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                CacheControl=self.cache_control,
                Metadata=metadata,
            ),
            f"put {key}",
        )

    def put_bytes(self, key: str, body: bytes, *, content_type: str) -> None:
        self._run(
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
            ),
            f"put {key}",
        )

    def get_bytes(self, key: str) -> bytes:
        async def read() -> bytes:
            obj = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with obj["Body"] as stream:
                data: bytes = await stream.read()
            return data

        return self._run(read(), f"get {key}")

    def stored_sha256(self, key: str) -> str | None:
        """The ``sha256`` metadata of the object at ``key``, or None if there is no object."""

        async def head() -> str | None:
            try:
                obj = await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            meta: dict[str, str] = obj.get("Metadata", {})
            return meta.get("sha256")

        return self._run(head(), f"head {key}")

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (embedded dev stack and tests; production provisions it)."""

        async def create() -> None:
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                await self._client.create_bucket(Bucket=self.bucket)

        self._run(create(), f"create bucket {self.bucket}")

    def delete(self, key: str) -> None:
        """Delete one object; deleting one that is already gone is a success (idempotent)."""
        self._run(self._client.delete_object(Bucket=self.bucket, Key=key), f"delete {key}")

    def close(self) -> None:
        with self._lock:
            if self._loop.is_closed():
                return
            self._loop.run_until_complete(self._stack.aclose())
            self._loop.close()


_store: S3Store | None = None
_store_pid: int | None = None
_store_lock = threading.Lock()


def get_store() -> S3Store:
    """This process's store, created on first use (after fork) and then reused."""
    global _store, _store_pid
    with _store_lock:
        if _store is None or _store_pid != os.getpid():
            _store = S3Store(get_settings())  # an inherited one belongs to the parent: leave it
            _store_pid = os.getpid()
        return _store


def close_store() -> None:
    global _store, _store_pid
    with _store_lock:
        if _store is not None and _store_pid == os.getpid():
            _store.close()
        _store, _store_pid = None, None
