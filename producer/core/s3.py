"""The one place genq builds a boto3 S3 client (workers' storage, the client's downloads, the API's readiness probe and
manifest reads) and the one place it makes URLs of stored objects (:class:`ObjectUrls`: the job views of the HTTP API
and of ``Client.with_urls``, the API's redirects). boto3 is imported on first use, so ``import producer`` stays light.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from producer.contract import JobView
from producer.core.settings import S3Settings

if TYPE_CHECKING:
    from boto3.session import Session
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("genq.s3")

# Bodies up to this size go without ``Expect: 100-continue``, the threshold of the AWS SDK for Go v2
# (``ContinueHeaderThresholdBytes``, 2 MB by default).
CONTINUE_THRESHOLD_BYTES = 2 * 1024 * 1024


def _continue_only_for_large_bodies(params: dict[str, Any], **_: Any) -> None:
    """Drop the ``Expect: 100-continue`` header boto3 puts on every PUT with a file-like body when the body is small.

    The header makes the client send its headers, wait for the server's ``100 Continue`` and only then send the body:
    one more round trip per request, worth it only where a refused request would otherwise send megabytes for nothing.
    For an image of a few kB it cost 0.45 ms of client CPU, 0.6 ms of the S3 server's and 8 ms of latency per PUT
    (against a local S3 server); a body whose size is unknown keeps the header.
    """
    from botocore.utils import determine_content_length

    headers = params.get("headers", {})
    if "Expect" not in headers:
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size <= CONTINUE_THRESHOLD_BYTES:
        del headers["Expect"]


def make_s3_client(
    *,
    max_pool_connections: int = 16,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    attempts: int = 1,
    session: Session | None = None,
) -> S3Client:
    """Return a boto3 S3 client configured from the standard ``AWS_*`` variables (endpoint, credentials, region).

    URLs are presigned with SigV4. Bodies up to :data:`CONTINUE_THRESHOLD_BYTES` are sent without ``Expect:
    100-continue``.

    Args:
        max_pool_connections: HTTP connections kept per client; at least the number of threads sharing it.
        connect_timeout_s: longest wait for a connection.
        read_timeout_s: longest wait for each read of an answer.
        attempts: tries per call, boto3's own retries included; 1 where the caller retries itself (the workers'
            storage, inside a window the operator sets) or must answer fast (the API's readiness probe).
        session: the boto3 session to build it from (default: boto3's default session); :class:`ObjectUrls`
            passes its own, whose credentials it signs with.
    """
    import boto3  # lazily: a thin client imports boto3 only when it first touches S3
    import botocore.config

    config = botocore.config.Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=max_pool_connections,
        # Presigned URLs with SigV4 (boto3 presigns S3 with legacy SigV2 otherwise; newer regions refuse it).
        signature_version="s3v4",
        retries={"total_max_attempts": attempts, "mode": "standard"},
    )
    client = session.client("s3", config=config) if session is not None else boto3.client("s3", config=config)
    # After boto3's own handler for the same event, which adds the header to every PUT with a file-like body.
    client.meta.events.register_last("before-call.s3", _continue_only_for_large_bodies)
    return client


def public_url(base_url: str, key: str) -> str:
    """``<base_url>/<key>``, the key percent-encoded as S3 does in a path (``/`` and ``~`` kept)."""
    return f"{base_url.rstrip('/')}/{quote(key, safe='/~')}"


_SIGNATURE = "X-Amz-Signature"
_ALGORITHM = "AWS4-HMAC-SHA256"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sigv4_signer(
    template_url: str, template_key: str, secret_key: str, method: str = "GET"
) -> Callable[[str], str] | None:
    """A function presigning a ``method`` request (GET, or PUT for uploads) of any other key exactly as
    ``template_url`` (a URL boto3 presigned for ``template_key`` and the same method) was: same endpoint, addressing
    style, credential, date and lifetime; or None when it cannot.

    Presigning through boto3 costs about 0.2-0.4 ms per URL (endpoint rules, request serialisation, event hooks); this
    costs one SHA-256 and one HMAC per URL, so a view of 1,000 outputs stays cheap, and so do the workers' uploads.
    It is used only when it reproduces the template itself, character for character: a configuration it does not
    model (another signing algorithm, headers besides ``host``, a credential that changed meanwhile) gives None, and
    the caller presigns with boto3.

    Args:
        template_url: ``generate_presigned_url("get_object", ...)`` (``"put_object"`` for a PUT, without a content
            type: only ``host`` is signed) of a SigV4 (``s3v4``) client.
        template_key: the object key it was presigned for.
        secret_key: the secret of the access key named in the template's ``X-Amz-Credential``.
        method: the HTTP method the template was presigned for.
    """
    parts = urlsplit(template_url)
    encoded_key = quote(template_key, safe="/~")
    if parts.fragment or not parts.path.endswith(encoded_key) or f"&{_SIGNATURE}=" not in f"&{parts.query}":
        return None
    prefix = parts.path[: len(parts.path) - len(encoded_key)]
    query, _, signature = parts.query.rpartition(f"&{_SIGNATURE}=")
    params = dict(pair.partition("=")[::2] for pair in query.split("&"))
    if params.get("X-Amz-Algorithm") != _ALGORITHM or params.get("X-Amz-SignedHeaders") != "host":
        return None
    scope = unquote(params.get("X-Amz-Credential", "")).split("/")
    date = params.get("X-Amz-Date", "")
    if len(scope) != 5 or scope[4] != "aws4_request" or date[:8] != scope[1]:
        return None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    # The canonical query string is the sorted, already encoded pairs; it is the same for every key.
    canonical_query = "&".join(sorted(query.split("&")))
    credential_scope = "/".join(scope[1:])
    signing_key = _hmac(f"AWS4{secret_key}".encode(), scope[1])
    for part in scope[2:]:
        signing_key = _hmac(signing_key, part)
    origin = f"{parts.scheme}://{parts.netloc}"

    def sign(key: str) -> str:
        path = prefix + quote(key, safe="/~")  # S3 signs the path as sent, not normalised nor encoded twice
        canonical = f"{method}\n{path}\n{canonical_query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
        to_sign = f"{_ALGORITHM}\n{date}\n{credential_scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        digest = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{origin}{path}?{query}&{_SIGNATURE}={digest}"

    return sign if sign(template_key) == f"{origin}{parts.path}?{query}&{_SIGNATURE}={signature}" else None


class ObjectUrls:
    """GET URLs of stored objects, for whoever holds them: ``<GENQ_S3__PUBLIC_BASE_URL>/<key>`` when a CDN (or a
    public bucket) fronts the storage, else SigV4 presigned URLs living ``GENQ_S3__PRESIGN_EXPIRES_S``, made afresh on
    every call. Presigning is local (no request to S3). Thread-safe.

    A presigned URL names the storage endpoint, the bucket and the signing credential's access key id (never its
    secret), and grants a GET of that one object until it expires, to anyone who holds it.
    """

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: Any = None
        self._session: Any = None
        self._warned = False

    def _signing(self) -> tuple[Any, Any]:
        with self._lock:
            if self._client is None:
                import boto3.session

                self._session = boto3.session.Session()
                self._client = make_s3_client(session=self._session, max_pool_connections=2)
            return self._client, self._session

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A URL that GETs ``key``: public, or presigned for ``expires_s`` (default ``presign_expires_s``)."""
        return self.urls([key], expires_s)[0]

    def urls(self, keys: Sequence[str], expires_s: int | None = None) -> list[str]:
        """:meth:`url` of each key, in order; the presigned ones all carry the same date and lifetime."""
        base = self.settings.public_base_url
        if base:
            return [public_url(base, key) for key in keys]
        if not keys:
            return []
        client, session = self._signing()
        expires = expires_s or self.settings.presign_expires_s

        def presign(key: str) -> str:
            params = {"Bucket": self.settings.bucket, "Key": key}
            return str(client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires))

        first = presign(keys[0])
        if len(keys) == 1:
            return [first]
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
        sign = sigv4_signer(first, keys[0], frozen.secret_key) if frozen is not None else None
        if sign is None:
            if not self._warned:
                self._warned = True
                log.warning("presigning every URL with boto3 (slower): this S3 configuration is not plain SigV4")
            sign = presign
        return [first, *(sign(key) for key in keys[1:])]

    def with_urls(self, view: JobView, expires_s: int | None = None) -> JobView:
        """A copy of ``view`` whose outputs carry URLs (:meth:`urls`); the outputs of one WebDataset tar share its
        URL; so do its renditions and its contact sheet. A view without outputs or sheet is returned as it is."""
        if not view.outputs and view.sheet_key is None:
            return view
        renditions = [r.key for o in view.outputs for r in o.renditions or ()]
        sheet = [view.sheet_key] if view.sheet_key is not None else []
        keys = list(dict.fromkeys([*(o.key for o in view.outputs), *renditions, *sheet]))
        by_key = dict(zip(keys, self.urls(keys, expires_s), strict=True))
        outputs = [
            o.model_copy(
                update={
                    "url": by_key[o.key],
                    "renditions": [r.model_copy(update={"url": by_key[r.key]}) for r in o.renditions]
                    if o.renditions
                    else o.renditions,
                }
            )
            for o in view.outputs
        ]
        sheet_url = by_key[view.sheet_key] if view.sheet_key is not None else None
        return view.model_copy(update={"outputs": outputs, "sheet_url": sheet_url})
