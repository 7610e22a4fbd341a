"""Read a request body, multipart or JSON, into (image bytes, validated parameters)."""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .errors import ApiError, from_validation, invalid

P = TypeVar("P", bound=BaseModel)

MAX_FIELD_BYTES = 64 << 10
FILE_PART_HINT = "send the image as a file part (curl: -F image=@photo.jpg, with @)"
LIST_FIELDS = {"text", "boxes", "points", "texts"}
COORDS = {"box": 4, "boxes": 4, "point": 2, "points": 2}
_DIGITS = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
# One multipart coordinate, spaces around it allowed ("200, 110"); the OpenAPI patterns are made of it
NUMBER = rf"[ \t]*\+?{_DIGITS}[ \t]*"
_NUMBER = re.compile(NUMBER)
_NEGATIVE = re.compile(rf"[ \t]*-{_DIGITS}[ \t]*")  # out of range, not badly written: said as JSON's is


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(
    request: Request, params_model: type[P], json_model: type[P], max_fields: int, query: tuple[str, ...] = ()
) -> tuple[bytes, P]:
    """The image bytes and the parameters; `json_model` is `params_model` plus a base64 `image`. A query
    parameter not in `query` is a 422, as an unknown body field is (one that did nothing would go unnoticed)."""
    for name in request.query_params:
        if name not in query:
            takes = f"only {', '.join(query)}" if query else "none"
            raise invalid(name, f"unknown query parameter (this endpoint takes {takes}); parameters go in the body")
    kind = media_type(request)
    if kind == "application/json":
        # a UTF-8 BOM first (PowerShell writes one) is ignored, as RFC 8259 allows
        raw = (await request.body()).removeprefix(b"\xef\xbb\xbf")
        try:  # parsing and base64 decoding of a body up to max_body_bytes: off the event loop
            body = await run_in_threadpool(json_model.model_validate_json, raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors[0]["type"] == "json_invalid":  # not JSON at all: as malformed as a broken multipart body
                error = errors[0]["ctx"]["error"]
                if error.startswith("number out of range"):  # JSON, with a number no field takes
                    raise ApiError(422, "invalid_request", f"body: a number is out of range ({error})") from exc
                raise ApiError(422, "invalid_body", f"body: malformed JSON ({error})") from exc
            raise from_validation(exc) from exc
        return await run_in_threadpool(decode_base64, body.image), body
    if kind == "multipart/form-data":
        return await _read_form(request, params_model, max_fields)
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")


def decode_base64(text: str) -> bytes:
    """Bytes from base64, with or without a `data:image/...;base64,` prefix (any case, as URL schemes are), spaces
    and line breaks, and with or without its `=` padding (which many encoders leave out)."""
    text = text.strip()
    if text[:5].lower() == "data:":
        _, comma, text = text.partition(",")
        if not comma:
            raise invalid("image", "a data: URL has a comma before its base64 (data:image/png;base64,...)")
    text = "".join(text.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid("image", "not valid base64") from exc


async def _read_form(request: Request, params_model: type[P], max_fields: int) -> tuple[bytes, P]:
    try:
        form = await request.form(max_files=4, max_fields=max_fields, max_part_size=MAX_FIELD_BYTES)
    except Exception as exc:  # noqa: BLE001 - malformed multipart surfaces as several exception types
        detail = str(getattr(exc, "detail", exc))
        if "exceeded maximum size" in detail:  # a text part: the image too, if sent with -F 'image=<file'
            detail += f" (text fields are at most {MAX_FIELD_BYTES >> 10} KiB: {FILE_PART_HINT})"
        raise ApiError(422, "invalid_body", f"malformed multipart body: {detail}") from exc
    fields: dict[str, Any] = {}
    image: bytes | None = None
    for name in dict.fromkeys(form.keys()):
        values = form.getlist(name)
        if name == "image":
            if len(values) != 1:
                raise invalid("image", "give exactly one image")
            if not isinstance(values[0], UploadFile):  # its bytes were decoded as text: they cannot be had back
                raise invalid("image", f"a text field, not a file: {FILE_PART_HINT}")
            image = await values[0].read()
            continue
        if name not in params_model.model_fields:
            raise invalid(name, f"unknown field (fields: image, {', '.join(params_model.model_fields)})")
        if any(isinstance(v, UploadFile) for v in values):
            raise invalid(name, "must be a text field, not a file")
        parsed = [_parse_field(name, v, f"{name}.{i}" if name in LIST_FIELDS else name) for i, v in enumerate(values)]
        if name in LIST_FIELDS:
            fields[name] = parsed
        elif len(parsed) > 1:
            raise invalid(name, "give one value")
        else:
            fields[name] = parsed[0]
    if image is None:  # python-multipart drops a part whose closing boundary never came
        raise invalid("image", "field required" + ("" if form else " (the body has no complete part: cut short?)"))
    try:
        return image, params_model.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def _parse_field(name: str, value: str, label: str) -> Any:
    """Multipart boxes are 'x0,y0,x1,y1' and points 'x,y'; other fields go to pydantic as strings. An error names
    `label` (`points.1` for the second of many)."""
    if name not in COORDS:
        return value
    keys = ("x0", "y0", "x1", "y1") if COORDS[name] == 4 else ("x", "y")
    parts = value.split(",")
    if len(parts) == len(keys):
        for key, part in zip(keys, parts):
            if _NEGATIVE.fullmatch(part) and float(part) < 0:  # "-0" is badly written: the pattern has no sign
                raise invalid(f"{label}.{key}", f"Input should be greater than or equal to 0, got {part.strip()}")
    numbers = [float(p) for p in parts] if all(_NUMBER.fullmatch(p) for p in parts) else []
    if len(numbers) != len(keys) or not all(math.isfinite(n) for n in numbers):
        raise invalid(
            label, f"expected {len(keys)} comma-separated pixel coordinates '{','.join(keys)}', got {value!r}"
        )
    return dict(zip(keys, numbers))
