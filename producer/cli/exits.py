"""How every ``genq`` command reports bad input and failures: one line each (``genq --debug ...`` adds the traceback
above it), and an exit code that says which kind:

- 1 (:data:`FAILED`): the job failed, or another error;
- 2 (:data:`INVALID`): a bad request, option or setting: fix it and run again;
- 3 (:data:`UNAVAILABLE`): Redis or S3 did not answer or refused genq (address, credentials, bucket): the line names
  the service, where genq looked (never a password) and the setting that says so.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from producer.core.settings import GenqSettings
from producer.errors import ConfigurationError, GenqError, InvalidJob

FAILED = 1
INVALID = 2
UNAVAILABLE = 3

console = Console(stderr=True)
Model = TypeVar("Model", bound=BaseModel)
Settings = TypeVar("Settings", bound=GenqSettings)

_debug = False


def set_debug(on: bool) -> None:
    """Show the traceback of every error reported from now on (``genq --debug``)."""
    global _debug
    _debug = on


def fail(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    """Print ``error: <message>`` on one line (the traceback of ``exc`` above it with ``--debug``) and exit ``code``."""
    if _debug and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    console.print(f"[red]error[/]: {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def build(model: type[Model], fields: dict[str, Any]) -> Model:
    """``model`` from the options that were given (None left out); each invalid field on a line, then exit 2."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "request"
            console.print(f"[red]invalid request[/]: {where}: {escape(err['msg'])}", soft_wrap=True)
        raise typer.Exit(INVALID) from None


def load(settings: type[Settings]) -> Settings:
    """``settings()`` from the ``GENQ_*`` variables; each invalid one on a line naming the variable (never its value,
    which may be a secret), then exit 2."""
    from pydantic_settings import SettingsError

    try:
        return settings()
    except ConfigurationError as exc:
        fail(str(exc), INVALID, exc)
    except ValidationError as exc:
        for err in exc.errors():
            name = "GENQ_" + "__".join(str(p).upper() for p in err["loc"] if isinstance(p, str))
            console.print(f"[red]invalid setting[/] {name}: {escape(err['msg'])}", soft_wrap=True)
        if _debug:
            traceback.print_exception(exc, file=sys.stderr)
        raise typer.Exit(INVALID) from None
    except SettingsError as exc:  # a JSON setting that is not JSON
        fail(f"invalid setting: {exc}", INVALID, exc)


@contextmanager
def reported(settings: GenqSettings | None = None) -> Iterator[None]:
    """Turn what the block raises into one line and an exit code: InvalidJob and ConfigurationError exit 2, Redis or
    S3 out of reach exits 3 (:func:`unavailable`), any other genq error exits 1; anything else propagates.

    Args:
        settings: the command's settings, for the Redis URL a line names.
    """
    try:
        yield
    except InvalidJob as exc:
        if _debug:
            traceback.print_exception(exc, file=sys.stderr)
        console.print(f"[red]invalid request[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(INVALID) from None
    except ConfigurationError as exc:
        fail(str(exc), INVALID, exc)
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise  # a command's own exit, or typer's report of a bad option: already said
    except Exception as exc:
        problem = unavailable(exc, settings)
        if problem is not None:
            fail(problem, UNAVAILABLE, exc)
        if isinstance(exc, GenqError):
            fail(str(exc), FAILED, exc)
        raise


def unavailable(exc: BaseException, settings: GenqSettings | None = None) -> str | None:
    """What to say when ``exc``, or an exception that caused it, is Redis or S3 out of reach or refusing genq: the
    service, where genq looked and the setting to check; None for any other error.

    Args:
        exc: what a command raised.
        settings: where the Redis URL comes from (None: the line says "Redis" without a URL).
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        line = _redis_problem(cause, settings) or _s3_problem(cause, settings)
        if line is not None:
            return line
        cause = cause.__cause__ if cause.__cause__ is not None or cause.__suppress_context__ else cause.__context__
    return None


def _redis_problem(exc: BaseException, settings: GenqSettings | None) -> str | None:
    # Only modules already imported can have raised: looking them up this way imports neither redis nor kombu.
    redis_errors = sys.modules.get("redis.exceptions")
    kombu_errors = sys.modules.get("kombu.exceptions")
    unreachable: tuple[type[BaseException], ...] = ()
    if redis_errors is not None:
        unreachable += (redis_errors.ConnectionError, redis_errors.TimeoutError)
    if kombu_errors is not None:
        unreachable += (kombu_errors.OperationalError,)  # Celery publishing a message
    if not unreachable or not isinstance(exc, unreachable):
        return None
    url = settings.redis.url if settings is not None else None
    where = f" at {redact(url)}" if url else ""
    return f"cannot reach Redis{where} (GENQ_REDIS__URL): {_one_line(exc)}"


_S3_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_S3_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def _s3_problem(exc: BaseException, settings: GenqSettings | None) -> str | None:
    errors = sys.modules.get("botocore.exceptions")
    if errors is None:
        return None
    setting = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = os.environ.get(setting) or ""
    where = f"at {redact(endpoint)}" if endpoint else f"on AWS (no {setting})"
    if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
        return f"no credentials for S3 {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(exc, errors.ConnectionError | errors.HTTPClientError):
        reached = getattr(exc, "kwargs", {}).get("endpoint_url")
        if reached and not endpoint:
            where = f"at {redact(reached, path=False)}"
        return f"cannot reach S3 {where} ({setting}): {_one_line(exc)}"
    if isinstance(exc, errors.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = settings.s3.bucket if settings is not None else None
        if code in _S3_MISSING_BUCKET:
            named = f" {bucket!r}" if bucket else ""
            return f"S3 bucket{named} does not exist {where} (GENQ_S3__BUCKET)"
        if code in _S3_DENIED:
            return (
                f"S3 {where} refused genq ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the policy of "
                f"bucket {bucket!r} (GENQ_S3__BUCKET)"
            )
        return f"S3 {where} refused a request: {_one_line(exc)}"
    return None


def redact(url: str, *, path: bool = True) -> str:
    """``url`` without user name, password or query (where a password may hide), and without its path unless
    ``path``: what an error message may show."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: show none rather than fail while reporting another error
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path if path else ''}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
