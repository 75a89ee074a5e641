"""Object storage of job outputs on S3 (clients from :func:`producer.core.s3.make_s3_client`), and
:func:`make_storage`, which picks S3 or a local folder (embedded mode, :mod:`worker.storage.local`).

The pipeline sees only the :class:`Storage` protocol. :class:`S3Storage` retries transient faults (connection
refused, timeouts, 5xx, throttling) with exponential backoff and full jitter inside a time window and turns what is
left into :class:`StorageUnavailable` (the job is retried later) or :class:`StorageError` (the job fails now). Each
call has a window of its own, unless the storage is scoped to a :class:`~worker.storage.base.RetryWindow`
(:meth:`S3Storage.within`): a shard's uploads then share one.
"""

from __future__ import annotations

import builtins
import copy
import functools
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, TypeVar, cast

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from producer.core.s3 import make_s3_client
from producer.errors import ConfigurationError
from worker.errors import ObjectNotFound, StorageError, StorageUnavailable
from worker.settings import StorageRetrySettings
from worker.storage.base import RetryWindow, Storage
from worker.storage.local import LocalStorage
from worker.storage.presigned import PresignedPuts, Put

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType
    from mypy_boto3_s3.type_defs import DeleteObjectsOutputTypeDef, ListObjectsV2OutputTypeDef

log = logging.getLogger("genq.storage")

T = TypeVar("T")

# Faults of the network or of a busy server: the same request may well succeed a moment later.
_TRANSIENT_EXCEPTIONS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    IncompleteReadError,
    ResponseStreamingError,
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
    }
)
_BUCKET_MISSING_CODES = frozenset({"NoSuchBucket"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys per request


def is_transient(exc: BaseException) -> bool:
    """Return whether ``exc`` is a fault worth retrying: connection errors, timeouts, 5xx and throttling."""
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return True
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return False


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """:class:`Storage` on an S3 bucket, retrying transient faults with exponential backoff and jitter.

    Args:
        bucket: bucket holding every object (``GENQ_S3__BUCKET``).
        retry: how long and how fast transient faults are retried.
        client: a boto3 S3 client; by default one from :func:`make_s3_client`, whose small uploads then skip boto3's
            per-request machinery (:class:`~worker.storage.presigned.PresignedPuts`).
        max_pool_connections: passed to :func:`make_s3_client` when no client is given.
        page_size: keys per ListObjectsV2 request (at most 1,000; smaller in tests of pagination).
    """

    def __init__(
        self,
        bucket: str,
        retry: StorageRetrySettings,
        *,
        client: S3Client | None = None,
        max_pool_connections: int = 16,
        page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.retry = retry
        self._puts: PresignedPuts | None = None
        if client is None:
            import boto3.session

            session = boto3.session.Session()
            client = make_s3_client(max_pool_connections=max_pool_connections, session=session)
            self._puts = PresignedPuts(client, session, bucket)
        self.client = client
        self.page_size = page_size
        self._window: RetryWindow | None = None  # shared by every call; None: a window per call

    def within(self, window: RetryWindow) -> S3Storage:
        """This storage (same client and pool), every call retrying inside ``window`` (one shard's uploads)."""
        scoped = copy.copy(self)
        scoped._window = window
        return scoped

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        def upload() -> None:
            done = self._puts.put(key, data, content_type) if self._puts is not None else Put.SKIPPED
            if done is Put.STORED:
                return
            response = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            if done is Put.REFUSED and self._puts is not None:
                self._puts.refused_only(key, str(response["ResponseMetadata"]["HTTPStatusCode"]))

        self._call("put", key, upload)

    def put_file(self, key: str, source: IO[bytes], content_type: str) -> None:
        def upload() -> object:
            source.seek(0)  # a retried attempt sends the whole object again
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=source, ContentType=content_type)

        self._call("put", key, upload)

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            # Read the body inside the retried call: a connection dropped mid-stream is retried too.
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return self._call("get", key, read, missing_ok=False)

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key), missing_ok=False)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> builtins.list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            # Each page is retried on its own: a fault on page 40 does not restart the listing.
            page = self._call("list", prefix, functools.partial(self._list_page, prefix, token))
            keys.extend(obj["Key"] for obj in page.get("Contents", []) if "Key" in obj)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or token is None:
                return sorted(keys)

    def _list_page(self, prefix: str, token: str | None) -> ListObjectsV2OutputTypeDef:
        if token is None:
            return self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=self.page_size)
        return self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=prefix, MaxKeys=self.page_size, ContinuationToken=token
        )

    def url(self, key: str, expires_s: int) -> str:
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            response = self._call("delete", prefix, functools.partial(self._delete_batch, batch))
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} object(s) under {prefix!r} in bucket {self.bucket!r} at "
                    f"{self.endpoint}, e.g. {first.get('Key')!r}: {first.get('Code')} ({first.get('Message')})"
                )
        return len(keys)

    def _delete_batch(self, keys: builtins.list[str]) -> DeleteObjectsOutputTypeDef:
        return self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )

    def ensure_bucket(self, *, create: bool = True) -> bool:
        """Check at start-up that the bucket exists, and create it if it does not and ``create``
        (``GENQ_S3__CREATE_BUCKET``: local endpoints by default; production buckets are made by ops).

        Returns:
            Whether this call created the bucket.

        Raises:
            ConfigurationError: the bucket does not exist and ``create`` is false (names the bucket and the setting).
            StorageUnavailable: no answer within the retry window.
            StorageError: access is denied, or the bucket cannot be created.
        """

        def bucket_exists() -> bool:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc) in {"404", "NoSuchBucket"}:
                    return False
                raise
            return True

        def create_it() -> None:
            region = self.client.meta.region_name
            try:
                # us-east-1 is the default location, and the one S3 refuses as an explicit LocationConstraint.
                if region and region != "us-east-1":
                    location = cast("BucketLocationConstraintType", region)
                    self.client.create_bucket(
                        Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": location}
                    )
                else:
                    self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                # Another process created it between our check and our create: that is what we wanted.
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

        if self._call("check", "", bucket_exists):
            return False
        if not create:
            raise ConfigurationError(
                f"bucket {self.bucket!r} (GENQ_S3__BUCKET) does not exist at {self.endpoint}: create it, or set "
                "GENQ_S3__CREATE_BUCKET=true to have workers create it at start"
            )
        log.info("creating bucket %r at %s", self.bucket, self.endpoint)
        self._call("create bucket", "", create_it)
        return True

    def _call(self, op: str, key: str, fn: Callable[[], T], *, missing_ok: bool = True) -> T:
        """Run ``fn``, retrying transient faults inside the retry window, and translate what is left into genq's
        storage errors.

        ``missing_ok=False`` turns a 404 into :class:`ObjectNotFound` (the key is missing, not the bucket).
        """
        window = self._window if self._window is not None else RetryWindow()
        attempt = 0
        while True:
            attempt += 1
            started = window.clock.now()
            try:
                result = fn()
            except (BotoCoreError, ClientError) as exc:
                if not is_transient(exc):
                    raise self._permanent(op, key, exc, missing_ok=missing_ok) from exc
                left = window.fault(started, self.retry.window_s)
                if left <= 0:
                    error = StorageUnavailable(
                        f"S3 {op} of {key!r} in bucket {self.bucket!r} at {self.endpoint} still failing after "
                        f"{attempt} attempts, {window.opened():.1f} s into the outage (window "
                        f"{self.retry.window_s:g} s): {exc}; check that the object store is up and reachable"
                    )
                    window.give_up(error)
                    raise error from exc
                if not window.may_retry():  # another call of the shard gave up, or the job ended
                    raise self._not_retried(op, key, exc, window) from exc
                # Full jitter, capped by what is left of the window: the last try comes at its end, not after.
                sleep = min(left, random.uniform(0, min(self.retry.max_s, self.retry.initial_s * 2 ** (attempt - 1))))
                self._log_retry(op, key, attempt, window.opened(), exc, sleep)
                window.sleep(sleep)
                if window.stopped:  # woken: another call gave up while this one waited
                    raise self._not_retried(op, key, exc, window) from exc
                continue
            window.answered()
            return result

    def _not_retried(self, op: str, key: str, exc: BaseException, window: RetryWindow) -> StorageUnavailable:
        why = "its job ended" if window.ended.is_set() else "another call of its shard gave up"
        return StorageUnavailable(
            f"S3 {op} of {key!r} in bucket {self.bucket!r} at {self.endpoint} failed ({exc}) and was not retried: {why}"
        )

    def _log_retry(self, op: str, key: str, attempt: int, outage_s: float, exc: BaseException, sleep: float) -> None:
        log.warning(
            "S3 %s of %r in bucket %r at %s failed (attempt %d, %.1f s into the outage): %s; retrying in %.2f s",
            op,
            key,
            self.bucket,
            self.endpoint,
            attempt,
            outage_s,
            exc,
            sleep,
        )

    def _permanent(self, op: str, key: str, exc: BotoCoreError | ClientError, *, missing_ok: bool) -> Exception:
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        if not isinstance(exc, ClientError):
            # NoCredentialsError, ParamValidationError, bad endpoint URL...: configuration, not the network.
            return StorageError(f"S3 {op} of {key!r} in {where} failed: {exc}")
        code = _error_code(exc)
        if code in _BUCKET_MISSING_CODES or (op in {"check", "create bucket"} and code in _NOT_FOUND_CODES):
            return StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it or set GENQ_S3__BUCKET"
            )
        if code in _NOT_FOUND_CODES and not missing_ok:
            return ObjectNotFound(f"no object {key!r} in {where}")
        if code in _DENIED_CODES:
            return StorageError(
                f"access denied ({code}) to S3 {op} of {key!r} in {where}: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        return StorageError(f"S3 {op} of {key!r} in {where} refused: {exc}")


def make_storage(
    kind: Literal["s3", "local"],
    *,
    bucket: str,
    local_dir: Path,
    retry: StorageRetrySettings,
    max_pool_connections: int = 16,
) -> Storage:
    """Return the storage a worker's settings ask for.

    Args:
        kind: ``"s3"`` (endpoint and credentials from ``AWS_*`` variables) or ``"local"``.
        bucket: the S3 bucket (ignored for ``"local"``).
        local_dir: the folder of ``"local"`` (ignored for ``"s3"``).
        retry: retries of transient S3 faults.
        max_pool_connections: size of boto3's connection pool; at least the number of upload threads.

    Raises:
        ConfigurationError: ``kind`` is neither.
    """
    if kind == "s3":
        return S3Storage(bucket, retry, max_pool_connections=max_pool_connections)
    if kind == "local":
        return LocalStorage(local_dir)
    raise ConfigurationError(f"unknown storage {kind!r} (known: s3, local)")
