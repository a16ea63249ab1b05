"""The `/_sandbox` routes: making orders, moving them on, breaking providers and sending
callbacks with curl, for people trying `order-bridge dev`. No credentials in any answer."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.sandbox import wire
from bridge.sandbox.book import Faults

if TYPE_CHECKING:
    from bridge.sandbox.app import Sandbox

_ORDER_KEYS = frozenset(
    {"account", "order_id", "status", "amount", "currency", "external_order_id"}
)
_CALLBACK_KEYS = '"account", "order_id", "url", "encoding"?, "status"?, "bad_sign"?'


def routes(box: Sandbox) -> list[Route]:
    """The control routes of `box`:

    GET  /_sandbox/orders                       every order
    POST /_sandbox/orders                       {"account", "order_id"?, "status"?, "amount"?,
                                                 "currency"?, "external_order_id"?} -> 201
    POST /_sandbox/orders/{account}/{order_id}  {"status": int}
    POST /_sandbox/faults/{account}             Faults' fields, e.g. {"down": true},
                                                {"refuse_ids": ["D1007..."]} or
                                                {"missing_ids": ["ord_..."]}
    POST /_sandbox/callbacks                    {"account", "order_id", "url", "encoding"?,
                                                 "status"?, "bad_sign"?} -> the receiver's answer
    """

    async def list_orders(request: Request) -> Response:
        return JSONResponse([order.to_json() for order in box.orders()])

    async def create_order(request: Request) -> Response:
        data = wire.parse_object(await request.body())
        if data is None:
            return _problem(400, "expected a JSON object")
        if unknown := sorted(set(data) - _ORDER_KEYS):
            return _problem(400, f"unknown keys: {', '.join(unknown)}")
        options = {k: v for k, v in data.items() if k != "account"}
        try:
            order = box.create_order(str(data.get("account")), **options)
        except KeyError as exc:
            return _problem(404, str(exc.args[0]))
        except (TypeError, ValueError) as exc:
            return _problem(400, str(exc))
        return JSONResponse(order.to_json(), status_code=201)

    async def update_order(request: Request) -> Response:
        account, order_id = request.path_params["account"], request.path_params["order_id"]
        data = wire.parse_object(await request.body())
        if data is None or set(data) != {"status"}:
            return _problem(400, 'expected {"status": <int>}')
        try:
            order = box.set_status(account, order_id, data["status"])
        except KeyError as exc:
            return _problem(404, str(exc.args[0]))
        except (TypeError, ValueError) as exc:
            return _problem(400, str(exc))
        return JSONResponse(order.to_json())

    async def update_faults(request: Request) -> Response:
        data = wire.parse_object(await request.body())
        if data is None:
            return _problem(400, "expected a JSON object of fault settings")
        try:
            faults = Faults(**{k: _plain(v) for k, v in data.items()})
            box.set_faults(request.path_params["account"], faults)
        except KeyError as exc:
            return _problem(404, str(exc.args[0]))
        except (TypeError, ValueError) as exc:
            return _problem(400, str(exc))
        return JSONResponse(dataclasses.asdict(faults))

    async def send_callback(request: Request) -> Response:
        data = wire.parse_object(await request.body())
        if data is None or not all(isinstance(data.get(k), str) for k in ("account", "order_id")):
            return _problem(400, f"expected {{{_CALLBACK_KEYS}}}")
        url = data.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return _problem(400, "url must be an http(s) URL")
        try:
            box.order(data["account"], data["order_id"])
            answer = await box.post_callback(
                url,
                data["account"],
                data["order_id"],
                encoding=data.get("encoding", "json"),
                status=data.get("status"),
                bad_sign=data.get("bad_sign") is True,
            )
        except KeyError as exc:
            return _problem(404, str(exc.args[0]))
        except (TypeError, ValueError) as exc:
            return _problem(400, str(exc))
        except httpx.HTTPError as exc:
            return _problem(502, f"could not post the callback: {type(exc).__name__}")
        return JSONResponse({"status_code": answer.status_code, "body": answer.text})

    return [
        Route("/_sandbox/orders", list_orders, methods=["GET"]),
        Route("/_sandbox/orders", create_order, methods=["POST"]),
        Route("/_sandbox/orders/{account}/{order_id}", update_order, methods=["POST"]),
        Route("/_sandbox/faults/{account}", update_faults, methods=["POST"]),
        Route("/_sandbox/callbacks", send_callback, methods=["POST"]),
    ]


def _plain(value: Any) -> Any:
    # parse_object reads fractions as Decimal; Faults holds floats.
    return float(value) if isinstance(value, Decimal) else value


def _problem(status_code: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status_code)
