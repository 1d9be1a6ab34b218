"""The fields of the plain upload's form (``POST /v1/tasks/{task}:classify``): names, bounds and typed values.

A form holds the ``clip`` file part and text fields: ``top_k``, ``request_id`` and the sampling overrides
(``server.frontends.oip_model.PARAMETERS``, the same names and kinds as OIP's request parameters); the same fields are
taken as query parameters. Pure functions over strings; the endpoint is ``server.frontends.http``.
"""

from __future__ import annotations

from typing import Any

from server.errors import BadRequest
from server.frontends.oip_model import PARAMETERS
from stadapter.config import brief

MAX_FORM_PARTS = 32  # a clip and a handful of options; more is not a classify form
MAX_FIELD_BYTES = 1024
FORM_FIELDS = {s.name: s.kind for s in PARAMETERS}


def check_field_name(key: str, is_file: bool = False) -> None:
    """Refuse a part the form does not take, before its value is read, saying what the form takes."""
    if is_file:  # a file under another name, as in the usual first try `curl -F file=@video.mp4`
        raise BadRequest(f"the clip goes in a file part named 'clip' (curl -F clip=@video.mp4); got a file part "
                         f"named {brief(key)}")
    if key != "top_k" and key != "request_id" and key not in FORM_FIELDS:
        raise BadRequest(f"unknown form field {brief(key)}; the form takes 'clip' (the file), 'top_k', "
                         f"'request_id' and the sampling overrides {sorted(k for k in FORM_FIELDS if k != 'top_k')}")


def set_field(fields: dict[str, str], key: str, value: str) -> None:
    """Record one text field; an unknown or repeated one is a :class:`BadRequest` naming what the form takes."""
    check_field_name(key)
    if key in fields:
        raise BadRequest(f"form field {key!r} is given twice")
    fields[key] = value


def int_field(value: str, key: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"form field {key!r} must be an integer, got {brief(value)}") from None
    if key == "top_k" and n < 0:
        raise BadRequest(f"top_k must be >= 0, got {brief(n)}")
    return n


def typed_field(key: str, value: str) -> Any:
    """A sampling override's value, typed as its OIP parameter is (int, bool or string)."""
    kind = FORM_FIELDS[key]
    if kind == "int64_param":
        return int_field(value, key)
    if kind == "bool_param":
        if value.lower() not in ("true", "false", "1", "0"):
            raise BadRequest(f"form field {key!r} must be true or false, got {brief(value)}")
        return value.lower() in ("true", "1")
    return value
