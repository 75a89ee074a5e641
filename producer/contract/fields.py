"""Field types the contract's models share: bounded numbers, names and free-form JSON.

Bounds live here, at the edge, so that whatever a caller sends can be stored and read back: a job record that cannot
be read would break every reader of it for its lifetime.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, JsonValue, TypeAdapter, ValidationError, ValidationInfo

MAX_SEED = 2**63 - 1


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is required, not true/false")
    return value


# Numbers in requests: pydantic's lax mode would read JSON's true/false as 1/0 ("seed": false as seed 0).
NotBool = BeforeValidator(_not_a_boolean)
OutputLayout = Literal["objects", "webdataset"]
# How outputs say they are AI-generated: xmp (IPTC DigitalSourceType in XMP, plus text fields; byte-identical on a
# rerun) or c2pa (that, plus a signed C2PA manifest: Content Credentials).
Provenance = Literal["xmp", "c2pa"]
_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
# A tenant name becomes part of Redis keys and S3 prefixes (tenants/<tenant>/jobs/...): no '/', no leading dot.
# ``Field(pattern=...)`` runs Rust's regex, where ``$`` is the end of the text; Python's ``re`` also lets ``$`` match
# before a trailing newline, so Python code uses these with ``fullmatch`` (and ``re`` patterns end with ``\Z``).
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_REF_PATTERN = re.compile(rf"^(?P<name>{_NAME})(?:@(?P<version>[A-Za-z0-9._-]{{1,64}})|:(?P<alias>{_NAME}))?\Z")

MAX_URL_CHARS = 2048  # a callback URL; longer ones are refused (browsers and proxies stop near there too)
MAX_JSON_DEPTH = 32
"""Deepest nesting of a free-form JSON field (``metadata``), counting objects and arrays, the field itself as level 1.

Far below what every reader of a job record takes (pydantic's JSON parser stops at 200 levels, and the record, a
webhook event and a Celery message each wrap the field in a few more)."""
MAX_JSON_BYTES = 64 * 1024
"""Largest free-form JSON field, as compact JSON (``json.dumps`` with ``separators=(",", ":")``), whoever sends it
(the HTTP API's default body limit). ``GENQ_LIMITS__MAX_METADATA_BYTES`` sets a lower one for every job's metadata,
generate and fine-tune alike (:func:`producer.core.resolve.check_metadata`)."""
_MAX_JSON_INT = 10**4300  # pydantic's JSON parser, like Python's int(), refuses integers of more than 4300 digits
_JSON_VALUE: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)


def _json_within_bounds(value: Any, info: ValidationInfo) -> Any:
    """Refuse free-form JSON that genq would store but could not read back, or would silently change.

    Runs before pydantic's own validation (which recurses) and walks the value without recursion, so a value nested
    thousands deep, cyclic, or built of shared references is refused cheaply: at most ``MAX_JSON_BYTES`` values are
    visited (each takes at least a byte of JSON). Anything else that is not JSON is left for pydantic to refuse.
    """
    field = info.field_name or "value"
    if not isinstance(value, dict | list):
        return value
    stack: list[tuple[Any, int]] = [(value, 1)]
    visited = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(
                    f"{field} nests objects and arrays more than {MAX_JSON_DEPTH} levels deep ({field} itself is "
                    "level 1): flatten it"
                )
            children = list(item.values()) if isinstance(item, dict) else item
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str):
                        _check_text(key, field)
            visited += 1 + len(children)
            if visited > MAX_JSON_BYTES:
                raise ValueError(f"{field} is larger than {MAX_JSON_BYTES} bytes as JSON")
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            name = "NaN" if math.isnan(item) else "Infinity" if item > 0 else "-Infinity"
            raise ValueError(
                f"{field} holds {name}, which JSON cannot carry (it would be stored as null): send a string or null"
            )
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _MAX_JSON_INT:
            raise ValueError(f"{field} holds an integer of more than 4300 digits: send it as a string")
        elif isinstance(item, str):
            _check_text(item, field)
    return value


def _check_text(text: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"{field} holds a string that is not valid Unicode (a lone surrogate such as \\ud800): fix its encoding"
        ) from None


def _json_reads_back(value: dict[str, JsonValue], info: ValidationInfo) -> dict[str, JsonValue]:
    """Refuse free-form JSON larger than ``MAX_JSON_BYTES``, or that does not read back as it was sent (a last check
    beside the walk above: whatever the JSON parser refuses, a job record holding it could never be read)."""
    field = info.field_name or "value"
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_JSON_BYTES:  # ASCII (json.dumps escapes the rest): characters are bytes
        raise ValueError(f"{field} is {len(text)} bytes as JSON, the limit is {MAX_JSON_BYTES}")
    try:
        _JSON_VALUE.validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"{field} does not read back as JSON ({exc.errors()[0]['msg']})") from None
    return value


FreeFormJson = Annotated[dict[str, JsonValue], BeforeValidator(_json_within_bounds), AfterValidator(_json_reads_back)]
"""A caller's free-form JSON object (``metadata``), bounded so that a job record holding it always reads back: at
most ``MAX_JSON_DEPTH`` levels and ``MAX_JSON_BYTES`` bytes, no NaN or Infinity (JSON has none; pydantic would store
null), no lone surrogates, no integer longer than the JSON parser reads."""
