"""The receiver's HTTP routes as an OpenAPI 3.1 document, served at `GET /openapi.json`.

The document is built here, beside the routes it describes; `docs/openapi.json` is its
copy for readers (`python -m bridge.openapi > docs/openapi.json`), and a test keeps
both equal and naming exactly the routes `create_app` has.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from bridge import __version__, providers
from bridge.metrics import CONTENT_TYPE

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before sending the request again",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def _text(
    description: str, example: str | None = None, media_type: str = "text/plain"
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["examples"] = [example]
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _callback() -> dict[str, Any]:
    body = {"type": "object", "additionalProperties": True}
    return {
        "operationId": "postCallback",
        "summary": "A provider's callback: a hint that an order changed",
        "description": (
            "Stored in the inbox topic, then answered with the ack the provider expects. "
            "The order's real state is confirmed by the provider's signed query; what the "
            "callback claims is never published as such."
        ),
        "parameters": [
            {
                "name": "provider",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": list(providers.names())},
            },
            {
                "name": "account",
                "in": "path",
                "required": True,
                "description": "The account's name in the config",
                "schema": {"type": "string", "pattern": "^[a-z0-9-]+$"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body},
                "application/x-www-form-urlencoded": {"schema": body},
            },
        },
        "responses": {
            "200": _text(
                "Stored in the inbox: the provider's ack (`ok` for kasushou, `success` "
                "otherwise, or the account's `callback_ack`)",
                "success",
            ),
            "400": _text(
                "Unparseable, not UTF-8, or naming no order or a bad order id (kept as a "
                "dead letter)"
            ),
            "401": _text("kasushou: the signature is wrong (kept as a dead letter)"),
            "404": _text("Unknown provider or account"),
            "408": _text("Headers or body not received in time"),
            "413": _text("Body over `max_body_bytes`; the connection is closed"),
            "415": _text("Neither JSON nor form-encoded (kept as a dead letter)"),
            "503": {
                **_text("Kafka did not take the callback in time: send it again"),
                "headers": _RETRY_AFTER,
            },
        },
    }


def _watch() -> dict[str, Any]:
    request = {
        "type": "object",
        "required": ["provider", "account", "order_id"],
        "properties": {
            "provider": {"type": "string", "enum": list(providers.names())},
            "account": {"type": "string"},
            "order_id": {
                "type": "string",
                "maxLength": 128,
                "description": "No commas, spaces, control or invisible characters",
            },
        },
    }
    accepted = {
        "type": "object",
        "required": ["status", "key"],
        "properties": {
            "status": {"const": "accepted"},
            "key": {"type": "string", "description": "provider/account/order_id"},
        },
    }
    return {
        "operationId": "watchOrder",
        "summary": "Confirm and follow an order whose callback may never come",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request}},
        },
        "responses": {
            "202": _json("Stored in the inbox: the order is confirmed and followed", accepted),
            "400": _json("Not JSON, or a field missing or breaking the order id rules", _ERROR),
            "404": _json("Unknown provider or account", _ERROR),
            "408": _text("Headers or body not received in time"),
            "413": _json("Body over `max_body_bytes`; the connection is closed", _ERROR),
            "503": {
                **_json("Kafka did not take the request in time: send it again", _ERROR),
                "headers": _RETRY_AFTER,
            },
        },
    }


def _readyz() -> dict[str, Any]:
    strings = {"type": "array", "items": {"type": "string"}}
    ready = {
        "type": "object",
        "required": ["ready", "degraded"],
        "properties": {"ready": {"type": "boolean"}, "problems": strings, "degraded": strings},
    }
    return {
        "operationId": "readyz",
        "summary": "Readiness: Kafka reachable, worker running, no partition stalled",
        "responses": {
            "200": _json("Ready; `degraded` lists accounts whose circuit breaker is open", ready),
            "503": _json("Not ready: `problems` says why", ready),
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document of the receiver's routes."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "order-bridge receiver",
            "version": __version__,
            "description": (
                "Providers' callbacks and watch requests in; order-status events out on "
                "Kafka (see docs/asyncapi.yaml). Nothing is answered 2xx before it is "
                "stored in the inbox topic."
            ),
        },
        "paths": {
            "/callbacks/{provider}/{account}": {"post": _callback()},
            "/orders/watch": {"post": _watch()},
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: 200 while the process lives",
                    "responses": {"200": _text("Alive", "ok")},
                }
            },
            "/readyz": {"get": _readyz()},
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {"200": _text("The Prometheus text format", None, CONTENT_TYPE)},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
    }


_BODY = orjson.dumps(document(), option=orjson.OPT_INDENT_2) + b"\n"


async def serve(request: Request) -> Response:
    """`GET /openapi.json`."""
    return Response(_BODY, media_type="application/json")


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(_BODY)
