"""Bytes as the sandbox providers put them on the wire: JSON with exact numbers, proxy pages."""

from __future__ import annotations

import json
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

from starlette.responses import Response

JSON_TYPE = "application/json; charset=utf-8"
FORM_TYPE = "application/x-www-form-urlencoded"


def dumps(value: Any) -> bytes:
    """Compact JSON with non-ASCII left as is, where a `Decimal` becomes a JSON number
    written exactly as its text: `Decimal("0.4")` is `0.4`, never `0.40000000000000002`."""
    return _text(value).encode()


# json.dumps(s, ensure_ascii=False) for a str, without json.dumps's per-call setup:
# calling it for every scalar was a quarter of the benchmarks' sandbox CPU.
_string = json.encoder.encode_basestring


def _text(value: Any) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if type(value) is int:
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} has no JSON form")
        return str(value)
    if isinstance(value, dict):
        items = (f"{_string(str(k))}:{_text(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def jsonable(value: Any) -> Any:
    """`value` with every Decimal as its exact string, for answers that are not the provider's."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def json_response(value: Any, status_code: int = 200) -> Response:
    return Response(dumps(value), status_code=status_code, media_type=JSON_TYPE)


def parse_object(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None when it is anything else."""
    try:
        value = json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def millis() -> str:
    """Now as 13-digit Unix milliseconds, as kasushou writes times."""
    return str(time.time_ns() // 1_000_000)


def clock(moment: datetime | None) -> str:
    """A time as `YYYY-MM-DD HH:MM:SS`, or "" when unset (lemft's style)."""
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _nginx_page(status: str) -> bytes:
    return (
        f"<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def bad_gateway() -> Response:
    return Response(_nginx_page("502 Bad Gateway"), 502, media_type="text/html")


def unavailable() -> Response:
    return Response(_nginx_page("503 Service Temporarily Unavailable"), 503, media_type="text/html")


def garbage() -> Response:
    """What a crashed PHP backend behind a healthy proxy answers: 200, and not JSON."""
    text = (
        "<br />\n<b>Fatal error</b>:  Uncaught PDOException: SQLSTATE[HY000] [2002] "
        "Connection refused in /www/wwwroot/api/app/Order.php:88\nStack trace:\n#0 {main}"
    )
    return Response(text, 200, media_type="text/html")
