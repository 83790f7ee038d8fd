"""S3 access: one event loop (in its own thread) and one aiobotocore client per process.

The client is created lazily in the process that uses it (and eagerly at ``worker_process_init``),
never inherited across fork, and reused for every task and request. Short blips (500/503,
throttling, dropped connections) are retried inside botocore with its ``standard`` retry mode
(exponential backoff with jitter); what is still failing after that surfaces as
:class:`TransientS3Error` for Celery to retry later, while errors no retry can fix surface as
:class:`PermanentS3Error`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
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
# A thread waiting on an S3 call wakes this often: an exception raised in it meanwhile (the
# threads pool's soft time limit, worker.pool) lands within this long, not at the call's end.
WAIT_SLICE_SECONDS = 0.25


def _wait(future: concurrent.futures.Future[T], timeout: float) -> T:
    """``future.result(timeout)``, waited for in short slices; bounded even if the loop thread
    is gone (a store closed under a running call)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(
                timeout=max(0.0, min(WAIT_SLICE_SECONDS, deadline - time.monotonic()))
            )
        except TimeoutError:
            if future.done() or time.monotonic() >= deadline:
                raise  # the call's own timeout, or no answer within the budget


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


# An ETag no object has (an MD5 of nothing the probe writes).
PROBE_WRONG_ETAG = "0" * 32


class S3Error(Exception):
    """Base of the two S3 failure kinds; the message is readable on its own."""


class TransientS3Error(S3Error):
    """Worth retrying later: the service or the network is having a bad moment."""


class PermanentS3Error(S3Error):
    """Retrying will not help: wrong bucket, wrong credentials, invalid request."""


# An HTTP client's exception can quote a whole response body over several lines; the message
# ends up in a deployment's ``error``, which operators read in a table.
MAX_DETAIL_CHARS = 240


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_DETAIL_CHARS else flat[: MAX_DETAIL_CHARS - 1] + "…"


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
    message = f"S3 {action} failed: {type(exc).__name__}: {_one_line(str(exc))}"
    if isinstance(exc, PERMANENT_CLIENT_ERRORS):
        return PermanentS3Error(message)
    return TransientS3Error(message)


class PreconditionFailed(S3Error):
    """A conditional write lost: the object changed (or appeared) since it was read."""


# 412 PreconditionFailed, or 409 ConditionalRequestConflict (a concurrent conditional write).
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})


def _is_precondition_failure(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code in _PRECONDITION_CODES or status == 412


@dataclass(frozen=True)
class StoredObject:
    """What a HEAD says about an object: its ETag and its ``x-amz-meta-*`` metadata."""

    etag: str
    metadata: dict[str, str]


class S3Store:
    """A bucket, through one long-lived aiobotocore client.

    The client lives on an event loop that runs in a thread of its own, so any number of threads
    (the API's request threads, a worker's task) can have calls in flight at once on the one
    client and its connection pool; each call has a deadline.
    """

    clients_created = 0  # per process; the worker tests check it stays at one

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.cache_control = settings.s3_cache_control
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="s3-event-loop", daemon=True
        )
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        config = AioConfig(
            retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            max_pool_connections=settings.s3_max_connections,
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
        self._client = asyncio.run_coroutine_threadsafe(
            self._stack.enter_async_context(creator), self._loop
        ).result()
        type(self).clients_created += 1

    def _run(self, coro: Coroutine[Any, Any, T], action: str) -> T:
        """Run one S3 call on the loop thread and wait for it, within the call budget.

        If the waiting thread is interrupted (Celery's soft time limit is raised here), the call
        is cancelled rather than left running. Conditional writes make even a request that
        reached S3 before the cancel harmless: it cannot replace a newer file.
        """
        running: list[asyncio.Task[Any]] = []

        async def tracked() -> T:
            task = asyncio.current_task()
            assert task is not None
            running.append(task)
            return await asyncio.wait_for(coro, S3_CALL_BUDGET_SECONDS)

        future = asyncio.run_coroutine_threadsafe(tracked(), self._loop)
        try:
            return _wait(future, S3_CALL_BUDGET_SECONDS + 5)
        except ClientError as exc:
            if _is_precondition_failure(exc):
                raise PreconditionFailed(f"S3 {action}: precondition failed") from exc
            raise classify(exc, action) from exc
        except BotoCoreError as exc:
            raise classify(exc, action) from exc
        except concurrent.futures.CancelledError as exc:
            raise TransientS3Error(f"S3 {action} failed: the S3 client was closed") from exc
        except TimeoutError as exc:
            raise TransientS3Error(
                f"S3 {action} failed: no answer within {S3_CALL_BUDGET_SECONDS}s"
            ) from exc
        finally:
            if not future.done():
                future.cancel()  # cancels the task on the loop thread, soon
                self._wait_cancelled(running)

    def _wait_cancelled(self, running: list[asyncio.Task[Any]]) -> None:
        """Block until an abandoned call's task has really finished cancelling."""

        async def drain() -> None:
            if running:
                await asyncio.wait(running, timeout=S3_CALL_BUDGET_SECONDS)

        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(timeout=10)

    def put_json(
        self,
        key: str,
        body: bytes,
        *,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        cache_control: str | None = None,
    ) -> str:
        """Write a published file; returns its ETag. Conditional when asked: ``If-Match`` an
        ETag, or ``If-None-Match: *`` (only if absent); a lost condition is
        :class:`PreconditionFailed`. ``cache_control``: the store's (``S3_CACHE_CONTROL``) unless
        given."""
        conditions: dict[str, str] = {}
        if if_match is not None:
            conditions["IfMatch"] = if_match
        elif if_none_match:
            conditions["IfNoneMatch"] = "*"

        async def put() -> str:
            try:
                out = await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    CacheControl=cache_control or self.cache_control,
                    Metadata=metadata,
                    **conditions,
                )
            except ClientError as exc:
                # ``If-Match`` on a key that no longer exists: S3 answers 404 NoSuchKey.
                code = exc.response.get("Error", {}).get("Code")
                if if_match is not None and code in ("NoSuchKey", "404"):
                    raise PreconditionFailed(f"S3 put {key}: the object is gone") from exc
                raise
            return str(out["ETag"])

        return self._run(put(), f"put {key}")

    def put_bytes(
        self, key: str, body: bytes, *, content_type: str, content_disposition: str | None = None
    ) -> None:
        extra = {"ContentDisposition": content_disposition} if content_disposition else {}
        self._run(
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra
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

    def head(self, key: str) -> StoredObject | None:
        """The object's ETag and metadata, or None if there is no object at ``key``."""

        async def head() -> StoredObject | None:
            try:
                obj = await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return StoredObject(str(obj["ETag"]), dict(obj.get("Metadata", {})))

        return self._run(head(), f"head {key}")

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (all pages)."""

        async def collect() -> list[str]:
            keys: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(str(item["Key"]) for item in page.get("Contents", []))
            return keys

        return self._run(collect(), f"list {prefix}")

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (embedded dev stack and tests; production provisions it)."""

        async def create() -> None:
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                await self._client.create_bucket(Bucket=self.bucket)

        self._run(create(), f"create bucket {self.bucket}")

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete one object; deleting one that is already gone is a success (idempotent).
        ``if_match``: only if it still is that version (else :class:`PreconditionFailed`)."""
        condition = {"IfMatch": if_match} if if_match is not None else {}

        async def delete() -> None:
            try:
                await self._client.delete_object(Bucket=self.bucket, Key=key, **condition)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if if_match is not None and code in ("NoSuchKey", "404"):
                    raise PreconditionFailed(f"S3 delete {key}: the object is gone") from exc
                raise

        self._run(delete(), f"delete {key}")

    def supports_conditional_writes(self) -> bool:
        """Probe both conditions the publish order rests on: a second ``If-None-Match: *``
        write of one key must be refused (412), and so must an ``If-Match`` write naming an
        ETag the object does not have.

        A store that silently ignores either header would let an older snapshot replace a newer
        one (``If-None-Match`` guards a first publish, ``If-Match`` every later one), so the
        worker refuses to start on such a store (:mod:`worker.celery`).
        """
        key = f"_probe/conditional-writes/{uuid.uuid4().hex}"
        try:
            # The first write may land with its answer lost; botocore's retry is then refused.
            with contextlib.suppress(PreconditionFailed):
                self.put_json(key, b"{}", metadata={}, if_none_match=True)
            try:
                self.put_json(key, b"{}", metadata={}, if_none_match=True)
                return False  # If-None-Match ignored
            except PreconditionFailed:
                pass
            try:
                self.put_json(key, b"{}", metadata={}, if_match=f'"{PROBE_WRONG_ETAG}"')
                return False  # If-Match ignored
            except PreconditionFailed:
                return True
        finally:
            with contextlib.suppress(S3Error):
                self.delete(key)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            # Calls still in flight (another thread's) end now, as cancelled, not never.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._stack.aclose()

        with contextlib.suppress(TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
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
