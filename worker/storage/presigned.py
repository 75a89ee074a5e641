"""Uploads of small objects without boto3's per-request machinery, on boto3's own connection pool.

boto3's ``put_object`` runs every request through its event hooks, endpoint rules, parameter validation,
serialisation, signing and response parsers: about 1.4 ms of CPU per PUT of a 700-byte image against a local S3
server, twice what the HTTP exchange itself costs, and paid for every image a worker stores. :class:`PresignedPuts`
sends the same PUT presigned from a SigV4 template that boto3 made (:func:`producer.core.s3.sigv4_signer`: one
SHA-256 and one HMAC per key) through the client's own ``http_session`` (its pool, proxies, TLS settings and
timeouts), with ``Content-MD5`` so that the server checks the bytes it stores.

It never changes an outcome, only its cost: a configuration the signer does not reproduce, a body above
:data:`~producer.core.s3.CONTINUE_THRESHOLD_BYTES` or a client without the session it needs goes through boto3;
a transient fault raises boto3's own exception type (the caller's retry window decides); a refusal or a redirect is
handed to boto3 for the same request, and if boto3 succeeds where the presigned request was refused (a redirect to
the bucket's region, a store that refuses presigned PUTs), uploads go through boto3 from then on.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError

from producer.core.s3 import CONTINUE_THRESHOLD_BYTES, sigv4_signer

if TYPE_CHECKING:
    from boto3.session import Session
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("genq.storage")

_TEMPLATE_KEY = "genq-presign-template"  # any key: only the template's date, scope and lifetime are reused
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,1024})</Message>")


class Put(Enum):
    """What :meth:`PresignedPuts.put` did."""

    STORED = "stored"  # the object is stored
    SKIPPED = "skipped"  # nothing was sent: upload it with boto3
    REFUSED = "refused"  # the store refused the presigned request: upload it with boto3, then call refused_only()


class PresignedPuts:
    """PUTs of bodies up to :data:`~producer.core.s3.CONTINUE_THRESHOLD_BYTES` presigned from a boto3 template.

    Thread-safe. The template lives ``expires_s`` and is made again every ``refresh_s``, so a URL signed from it
    has at least ``expires_s - refresh_s`` left: enough for one request and its retries, each signed afresh.

    Args:
        client: the boto3 S3 client whose pool, endpoint and configuration the uploads use.
        session: the boto3 session ``client`` was made from: its credentials sign the URLs.
        bucket: the bucket every upload goes to.
        refresh_s: age at which the template is made again.
        expires_s: lifetime of the template, and of every URL signed from it.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        client: S3Client,
        session: Session,
        bucket: str,
        *,
        refresh_s: float = 60.0,
        expires_s: int = 900,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.session = session
        self.bucket = bucket
        self.refresh_s = refresh_s
        self.expires_s = expires_s
        self.clock = clock
        # boto3's own transport: what put_object would send on, with the client's proxies, TLS and timeouts.
        self._http: Any = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._lock = threading.Lock()
        self._sign: Callable[[str], str] | None = None
        self._made = float("-inf")
        self.enabled = self._http is not None

    def _signer(self) -> Callable[[str], str] | None:
        now = self.clock()
        with self._lock:
            if not self.enabled:
                return None
            if now - self._made < self.refresh_s:
                return self._sign
            self._made = now
            credentials = self.session.get_credentials()
            if credentials is None:
                self._sign = None  # boto3 says why on the upload
                return None
            secret = credentials.get_frozen_credentials().secret_key or ""
            template = self.client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": _TEMPLATE_KEY}, ExpiresIn=self.expires_s
            )
            self._sign = sigv4_signer(template, _TEMPLATE_KEY, secret, method="PUT")
            if self._sign is None:
                # Credentials rotated between the template and the secret read, or a configuration the signer does
                # not model: boto3 uploads until the next template.
                log.info("uploading through boto3 for %g s: its presigned PUT is not plain SigV4", self.refresh_s)
            return self._sign

    def put(self, key: str, data: bytes, content_type: str) -> Put:
        """PUT ``data`` at ``key`` with ``content_type``.

        Returns:
            STORED, or SKIPPED where boto3 must upload it (nothing was sent), or REFUSED where the store refused the
            presigned request or redirected it (3xx, 4xx but 429): the caller uploads it with boto3, and calls
            :meth:`refused_only` if boto3 succeeds.

        Raises:
            botocore.exceptions.BotoCoreError: the connection failed or timed out (boto3's own types).
            botocore.exceptions.ClientError: the store answered 5xx or 429, as boto3 would raise it.
        """
        if len(data) > CONTINUE_THRESHOLD_BYTES:
            return Put.SKIPPED
        sign = self._signer()
        if sign is None:
            return Put.SKIPPED
        digest = hashlib.md5(data, usedforsecurity=False).digest()  # S3 refuses a body that does not match it
        headers = {"Content-Type": content_type, "Content-MD5": base64.b64encode(digest).decode()}
        response = self._http.send(AWSRequest(method="PUT", url=sign(key), data=data, headers=headers).prepare())
        status = response.status_code
        if 200 <= status < 300:
            return Put.STORED
        error = client_error(status, dict(response.headers), response.content)
        if 300 <= status < 500 and status != 429:  # boto3 follows redirects to a bucket's region
            log.debug("presigned PUT of %r refused (%s): trying boto3", key, error)
            return Put.REFUSED
        raise error

    def refused_only(self, key: str, status: str) -> None:
        """boto3 stored ``key`` after the store refused its presigned PUT: upload through boto3 from now on."""
        with self._lock:
            if self.enabled:
                log.warning(
                    "the object store refused a presigned PUT of %r (%s) that boto3 then stored: uploading through "
                    "boto3 from now on (about 0.7 ms more CPU per object)",
                    key,
                    status,
                )
            self.enabled = False


def client_error(status: int, headers: dict[str, str], body: bytes) -> ClientError:
    """The :class:`ClientError` boto3 raises for an S3 error answer: the XML body's ``Code`` and ``Message``, or the
    status as the code where the body has none (a proxy's error page, a HEAD)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return ClientError(
        {
            "Error": {
                "Code": code.group(1).decode(errors="replace") if code else str(status),
                "Message": message.group(1).decode(errors="replace") if message else "",
            },
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},  # type: ignore[typeddict-item]
        },
        "PutObject",
    )
