"""The sandbox providers, over real HTTP on loopback: they must behave as the docs say,
since the bridge's adapters are tested against them. Signatures are computed here by
hand from the docs, not with the sandbox's or the adapters' code."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from bridge import providers
from bridge.accounts import Account
from bridge.errors import OrderNotFound
from bridge.query import query_order
from bridge.sandbox import Faults, Sandbox, wire
from bridge.servers import serve
from tests.conftest import RunningSandbox
from tests.helpers import (
    KASUSHOU_API_KEY,
    LEMFT_KEY,
    LUNPAY_SECRET,
    SECRETS,
    make_accounts,
)

KSU, LEM, LUN = "kasushou-test", "lemft-test", "lunpay-test"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def millis() -> str:
    return str(time.time_ns() // 1_000_000)


async def kasushou_post(
    http: httpx.AsyncClient,
    sandbox: RunningSandbox,
    body: str,
    *,
    timestamp: str | None = None,
    key: str = KASUSHOU_API_KEY,
    user_id: str = "10000",
    sign: str | None = None,
) -> httpx.Response:
    timestamp = timestamp or millis()
    headers = {
        "Sign": sign or sha1(timestamp + body + key),
        "Timestamp": timestamp,
        "UserId": user_id,
        "Content-Type": "application/json; charset=utf-8",
    }
    return await http.post(
        f"{sandbox.url}/kasushou/api/v1/order/info", content=body.encode(), headers=headers
    )


def ordersn_body(ids: str, day: int = 0) -> str:
    # The request rule: keys sorted, compact, `/` and non-ASCII left as they are.
    return json.dumps(
        {"day": day, "external_orderno": "", "ordersn": ids},
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def lunpay_body(
    order_no: str, sign: str, merchant_id: str = "M1001", account_id: str = "A77"
) -> dict[str, str]:
    return {
        "account_id": account_id,
        "merchant_id": merchant_id,
        "order_no": order_no,
        "sign": sign,
    }


def lemft_body(order_id: str, key: str = LEMFT_KEY) -> dict[str, Any]:
    return {"customer_id": 10000011, "app_id": 100001, "key": key, "order_id": order_id}


# -- kasushou ---------------------------------------------------------------------------


async def test_kasushou_answers_a_query_signed_as_documented(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(KSU, amount=Decimal("99.50"), external_order_id="ext-1")
    assert order.order_id.startswith("D1007")
    assert len(order.order_id) == 22

    response = await kasushou_post(http, sandbox, ordersn_body(order.order_id))

    assert response.status_code == 200
    answer = response.json()
    assert (answer["code"], answer["msg"]) == (200, "成功")
    (item,) = answer["data"]
    assert item["ordersn"] == order.order_id
    assert item["external_orderno"] == "ext-1"
    assert item["status"] == 1
    assert item["total_price"] == "99.50"
    assert item["has_back_money"] == "0.00"
    assert item["recharge_info"] == []
    (card,) = item["card_list"]
    assert card["card_no"]
    assert card["card_password"]
    assert card["card_show_type"] == 1
    assert sandbox.sandbox.queries[-1].outcome == "ok"
    assert sandbox.sandbox.queries[-1].account == KSU


async def test_kasushou_refund_shows_the_refunded_amount(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(KSU, amount=Decimal("12.30"), card_list=[])
    sandbox.sandbox.set_status(KSU, order.order_id, 5)
    (item,) = (await kasushou_post(http, sandbox, ordersn_body(order.order_id))).json()["data"]
    assert (item["status"], item["has_back_money"], item["card_list"]) == (5, "12.30", [])


async def test_kasushou_rejects_a_wrong_sign(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(KSU)
    body = ordersn_body(order.order_id)
    wrong_key = await kasushou_post(http, sandbox, body, key="not-the-key")
    # The sign covers the body bytes as sent: one extra space breaks it.
    ts = millis()
    respaced = await kasushou_post(
        http,
        sandbox,
        body.replace(":", ": "),
        timestamp=ts,
        sign=sha1(ts + body + KASUSHOU_API_KEY),
    )
    short_timestamp = await kasushou_post(http, sandbox, body, timestamp="1696645385")

    for response in (wrong_key, respaced, short_timestamp):
        assert response.status_code == 200
        assert response.json() == {"code": 400, "msg": "签名错误", "data": []}
    assert [q.outcome for q in sandbox.sandbox.queries] == ["bad_sign"] * 3
    assert sandbox.sandbox.queries[0].account == KSU


async def test_kasushou_rejects_an_unknown_user(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    response = await kasushou_post(http, sandbox, ordersn_body("D1"), user_id="99999")
    assert response.json() == {"code": 400, "msg": "用户不存在", "data": []}
    missing = await http.post(f"{sandbox.url}/kasushou/api/v1/order/info", content=b"{}")
    assert missing.json()["code"] == 400
    assert [(q.account, q.outcome) for q in sandbox.sandbox.queries] == [
        (None, "unknown_account"),
        (None, "unknown_account"),
    ]


async def test_kasushou_docs_test_vector(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    timestamp = "1696645385740"
    body = '{"day":10,"external_orderno":"","ordersn":"D100759082558859640832"}'
    documented = "15b8f541eb10e3fbb33efd92c8d52d50ddca0784"
    assert sha1(timestamp + body + KASUSHOU_API_KEY) == documented
    sandbox.sandbox.create_order(KSU, order_id="D100759082558859640832", status=3)

    response = await kasushou_post(http, sandbox, body, timestamp=timestamp, sign=documented)

    (item,) = response.json()["data"]
    assert (item["ordersn"], item["status"]) == ("D100759082558859640832", 3)


async def test_kasushou_batches_and_leaves_unknown_ids_out(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    orders = [box.create_order(KSU, external_order_id=f"ext-{i}") for i in range(3)]
    ids = [o.order_id for o in orders]

    batched = await kasushou_post(
        http, sandbox, ordersn_body(",".join([ids[0], "D_NOPE", *ids[1:]]))
    )
    by_external = await kasushou_post(
        http,
        sandbox,
        json.dumps({"day": 0, "external_orderno": "ext-2,ext-0"}, separators=(",", ":")),
    )
    none_known = await kasushou_post(http, sandbox, ordersn_body("D_NOPE"))

    assert [item["ordersn"] for item in batched.json()["data"]] == ids
    assert [item["ordersn"] for item in by_external.json()["data"]] == [ids[2], ids[0]]
    assert none_known.json() == {"code": 200, "msg": "成功", "data": []}


async def test_kasushou_hides_other_accounts_orders(http: httpx.AsyncClient) -> None:
    mine = make_accounts()["kasushou"]
    other = dataclasses.replace(
        mine, name="kasushou-other", settings=dataclasses.replace(mine.settings, user_id=20000)
    )
    box = Sandbox([mine, other])
    theirs = box.create_order("kasushou-other")
    async with serve(box.app) as url:
        running = RunningSandbox(box, url, {})
        response = await kasushou_post(http, running, ordersn_body(theirs.order_id))
    assert response.json()["data"] == []


# -- lunpay -----------------------------------------------------------------------------


async def test_lunpay_accepts_md5_by_default(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(LUN, amount=Decimal("375.28"), third_a_id="20951")
    sign = hashlib.md5(f"M1001A77{order.order_id}{LUNPAY_SECRET}".encode()).hexdigest()

    response = await http.post(
        f"{sandbox.url}/lunpay/api/order/query", json=lunpay_body(order.order_id, sign)
    )

    assert response.json() == {
        "code": 200,
        "msg": "success",
        "data": {
            "status": 1,
            "currency": "USD",
            "total": "375.28",
            "third_a_id": "20951",
            "third_b_id": "0",
        },
        "url": "",
        "wait": 3,
    }


async def test_lunpay_rejections(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    order = sandbox.sandbox.create_order(LUN)
    url = f"{sandbox.url}/lunpay/api/order/query"

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    wrong_sign = await http.post(url, json=lunpay_body(order.order_id, md5("M1001A77x")))
    unknown_merchant = await http.post(url, json=lunpay_body(order.order_id, "x", "M9"))
    unknown_order = await http.post(
        url, json=lunpay_body("404", md5(f"M1001A77404{LUNPAY_SECRET}"))
    )

    assert wrong_sign.json() == {"code": 403, "msg": "sign error"}
    assert unknown_merchant.json() == {"code": 403, "msg": "merchant not found"}
    assert unknown_order.json() == {"code": 403, "msg": "order not found"}
    assert [q.outcome for q in sandbox.sandbox.queries] == [
        "bad_sign",
        "unknown_account",
        "not_found",
    ]


@pytest.mark.parametrize(
    ("digest", "make_sign"),
    [
        ("sha256", lambda text: hashlib.sha256(text.encode()).hexdigest()),
        ("none", lambda text: text),
    ],
)
async def test_lunpay_other_digests(digest: str, make_sign: Any, http: httpx.AsyncClient) -> None:
    account = make_accounts()["lunpay"]
    account = dataclasses.replace(
        account, settings=dataclasses.replace(account.settings, sign_digest=digest)
    )
    box = Sandbox([account])
    order = box.create_order(LUN, status=4)
    text = f"M1001A77{order.order_id}{LUNPAY_SECRET}"
    md5 = hashlib.md5(text.encode()).hexdigest()
    async with serve(box.app) as url:
        good = await http.post(
            f"{url}/lunpay/api/order/query", json=lunpay_body(order.order_id, make_sign(text))
        )
        as_md5 = await http.post(
            f"{url}/lunpay/api/order/query", json=lunpay_body(order.order_id, md5)
        )
    assert good.json()["data"]["status"] == 4
    assert as_md5.json() == {"code": 403, "msg": "sign error"}


# -- lemft ------------------------------------------------------------------------------


async def test_lemft_rejects_a_wrong_key(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    order = sandbox.sandbox.create_order(LEM)
    url = f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder"
    wrong_key = await http.post(url, json=lemft_body(order.order_id, key="0" * 32))
    wrong_app = await http.post(url, json={**lemft_body(order.order_id), "app_id": 1})
    expected = {"code": 10001, "message": "invalid authorization key", "data": None}
    assert wrong_key.json() == expected
    assert wrong_app.json() == expected
    assert [(q.account, q.outcome) for q in sandbox.sandbox.queries] == [
        (LEM, "bad_sign"),
        (None, "unknown_account"),
    ]


async def test_lemft_answers_amounts_as_exact_json_numbers(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(
        LEM, amount=Decimal("20"), fee=Decimal("0.4"), order_type=2, external_order_id="out_1"
    )
    assert order.order_id.startswith("ord_")
    assert order.status == 0
    sandbox.sandbox.set_status(LEM, order.order_id, 1)
    url = f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder"

    response = await http.post(url, json=lemft_body(order.order_id))

    assert b'"amount":20,' in response.content
    assert b'"fee":0.4,' in response.content
    answer = json.loads(response.content, parse_float=Decimal)
    assert (answer["code"], answer["message"]) == (0, "success")
    info = answer["data"]["order_info"]
    assert info["order_id"] == order.order_id
    assert (info["status"], info["order_type"], info["out_order_id"]) == (1, 2, "out_1")
    assert (info["amount"], info["fee"], info["currency"]) == (20, Decimal("0.4"), "USD")
    assert len(info["create_at"]) == len(info["complete_at"]) == 19
    (bill,) = answer["data"]["order_bill_list"]
    assert (bill["bill_type"], bill["in_out_type"]) == (2, 2)
    assert bill["bill_list"] == [
        {"bill_category": 3, "amount": 20},
        {"bill_category": 4, "amount": Decimal("0.4")},
    ]


async def test_lemft_unknown_order_gives_empty_data(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    url = f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder"
    response = await http.post(url, json=lemft_body("ord_missing"))
    assert response.json() == {"code": 0, "message": "success", "data": {}}
    assert sandbox.sandbox.queries[-1].outcome == "not_found"


# -- malformed requests -----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b"\xff\xfe", b'{"order_id": 5}'])
async def test_malformed_bodies_get_error_envelopes(
    sandbox: RunningSandbox, http: httpx.AsyncClient, body: bytes
) -> None:
    lemft_answer = await http.post(
        f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder", content=body
    )
    lunpay_answer = await http.post(f"{sandbox.url}/lunpay/api/order/query", content=body)
    ts = millis()
    signed = await http.post(
        f"{sandbox.url}/kasushou/api/v1/order/info",
        content=body,
        headers={
            "Sign": hashlib.sha1(ts.encode() + body + KASUSHOU_API_KEY.encode()).hexdigest(),
            "Timestamp": ts,
            "UserId": "10000",
        },
    )
    assert lemft_answer.status_code == lunpay_answer.status_code == signed.status_code == 200
    assert lemft_answer.json()["code"] in (10001, 10002)
    assert lunpay_answer.json()["code"] == 403
    assert signed.json()["code"] == 400


# -- callbacks --------------------------------------------------------------------------


def php_callback_sign(fields: dict[str, str]) -> str:
    """The documented callback rule, written independently of the sandbox."""
    signed = {k: v for k, v in fields.items() if k not in ("sign", "card_list", "express_list")}
    text = json.dumps(dict(sorted(signed.items())), ensure_ascii=False, separators=(",", ":"))
    return sha1(fields["time"] + text.replace("/", "\\/") + KASUSHOU_API_KEY)


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_kasushou_callback_is_signed_by_the_callback_rule(
    sandbox: RunningSandbox, encoding: Any
) -> None:
    box = sandbox.sandbox
    order = box.create_order(KSU, external_order_id="ext/7")
    box.set_status(KSU, order.order_id, 3)

    body, content_type = box.callback(KSU, order.order_id, encoding=encoding)
    bad_body, _ = box.callback(KSU, order.order_id, encoding=encoding, bad_sign=True)

    if encoding == "json":
        assert content_type.startswith("application/json")
        fields, bad = json.loads(body), json.loads(bad_body)
        cards = fields["card_list"]
    else:
        assert content_type == "application/x-www-form-urlencoded"
        fields = dict(urllib.parse.parse_qsl(body.decode()))
        bad = dict(urllib.parse.parse_qsl(bad_body.decode()))
        cards = json.loads(fields["card_list"])
    assert cards == order.fields["card_list"]
    assert all(isinstance(v, str) for k, v in fields.items() if k != "card_list")
    assert (fields["ordersn"], fields["status"]) == (order.order_id, "3")
    assert fields["recharge_hints"] == "充值成功 / done"
    assert fields["external_orderno"] == "ext/7"
    assert re.fullmatch(r"[0-9]{13}", fields["time"])
    assert fields["sign"] == php_callback_sign(fields)
    assert bad["sign"] != php_callback_sign(bad)


async def test_callback_status_override_and_unsigned_providers(sandbox: RunningSandbox) -> None:
    box = sandbox.sandbox
    lem = box.create_order(LEM, amount=Decimal("20"))
    lun = box.create_order(LUN, amount=Decimal("375.28"))

    lem_fields = json.loads(box.callback(LEM, lem.order_id, status=1)[0])
    lun_form = box.callback(LUN, lun.order_id, encoding="form", status=4)

    assert lem_fields["event"] == "order.status.changed"
    assert (lem_fields["order_id"], lem_fields["status"], lem_fields["app_id"]) == (
        lem.order_id,
        1,
        100001,
    )
    assert re.fullmatch(r"[0-9]{16}", lem_fields["card_no"])
    for name in (
        "card_id",
        "out_order_id",
        "bin_id",
        "holder_id",
        "balance",
        "limit",
        "expiry",
        "cvv",
        "pin",
        "use_at",
        "close_at",
        "end_at",
        "mark",
    ):
        assert name in lem_fields
    assert dict(urllib.parse.parse_qsl(lun_form[0].decode())) == {
        "order_no": lun.order_id,
        "status": "4",
        "total": "375.28",
        "currency": "USD",
    }
    assert lem.status == 0  # a callback claims; it does not change the order
    with pytest.raises(ValueError, match="no signature"):
        box.callback(LUN, lun.order_id, bad_sign=True)


# -- faults -----------------------------------------------------------------------------


async def test_latency_delays_answers(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    order = sandbox.sandbox.create_order(LEM)
    sandbox.sandbox.set_faults(LEM, Faults(latency=0.3))
    started = time.monotonic()
    response = await http.post(
        f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder", json=lemft_body(order.order_id)
    )
    assert time.monotonic() - started >= 0.3
    assert response.json()["code"] == 0


async def test_error_rate_gives_three_kinds_of_failure(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    order = sandbox.sandbox.create_order(KSU)
    sandbox.sandbox.set_faults(KSU, Faults(error_rate=1.0))
    answers = [await kasushou_post(http, sandbox, ordersn_body(order.order_id)) for _ in range(3)]

    server_error, bad_gateway, garbage = answers
    assert server_error.status_code == 500
    assert server_error.json() == {"code": 500, "msg": "未知错误", "data": []}
    assert bad_gateway.status_code == 502
    assert b"<html>" in bad_gateway.content
    assert garbage.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbage.content)
    assert [q.outcome for q in sandbox.sandbox.queries] == ["fault"] * 3


async def test_hang_makes_the_client_time_out(sandbox: RunningSandbox) -> None:
    order = sandbox.sandbox.create_order(LUN)
    sandbox.sandbox.set_faults(LUN, Faults(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"{sandbox.url}/lunpay/api/order/query", json=lunpay_body(order.order_id, "x")
            )
    assert sandbox.sandbox.queries[-1].outcome == "hang"
    # The fixture's teardown then shows the server lets go of the hanging request.


async def test_turning_hang_off_answers_the_hanging_query(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    order = box.create_order(LEM)
    box.set_faults(LEM, Faults(hang=True))
    url = f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder"
    pending = asyncio.create_task(http.post(url, json=lemft_body(order.order_id)))
    async with asyncio.timeout(5):
        (arrived,) = await box.wait_for_queries(LEM, order.order_id)
    assert arrived.outcome == "hang"
    assert not pending.done()

    box.set_faults(LEM, Faults())

    response = await pending
    assert response.json()["data"]["order_info"]["order_id"] == order.order_id
    assert [q.outcome for q in box.queries] == ["hang"]


async def test_down_answers_503(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    sandbox.sandbox.set_faults(LEM, Faults(down=True))
    response = await http.post(
        f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder", json=lemft_body("ord_x")
    )
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert sandbox.sandbox.faults(LEM) == Faults(down=True)


async def test_refuse_ids_refuses_every_query_naming_them(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    bad, good = (box.create_order(KSU).order_id for _ in range(2))
    # Set through the control route, as a person trying the sandbox would.
    set_fault = await http.post(f"{sandbox.url}/_sandbox/faults/{KSU}", json={"refuse_ids": [bad]})
    assert set_fault.json()["refuse_ids"] == [bad]
    assert box.faults(KSU) == Faults(refuse_ids=(bad,))

    batch = await kasushou_post(http, sandbox, ordersn_body(f"{good},{bad}"))
    alone = await kasushou_post(http, sandbox, ordersn_body(good))

    # The docs' failure envelope, for the whole request.
    assert batch.status_code == 200
    assert batch.json() == {"code": 400, "msg": "订单号格式错误", "data": []}
    assert [o["ordersn"] for o in alone.json()["data"]] == [good]
    assert [q.outcome for q in box.queries] == ["refused", "ok"]
    bad_setting = await http.post(f"{sandbox.url}/_sandbox/faults/{KSU}", json={"refuse_ids": "x"})
    assert bad_setting.status_code == 400


async def signed_query(
    http: httpx.AsyncClient, sandbox: RunningSandbox, provider: str, order_id: str
) -> httpx.Response:
    """The provider's raw answer to a query for `order_id`, signed by hand from the docs."""
    if provider == "kasushou":
        return await kasushou_post(http, sandbox, ordersn_body(order_id))
    if provider == "lunpay":
        sign = hashlib.md5(f"M1001A77{order_id}{LUNPAY_SECRET}".encode()).hexdigest()
        return await http.post(
            f"{sandbox.url}/lunpay/api/order/query", json=lunpay_body(order_id, sign)
        )
    return await http.post(
        f"{sandbox.url}/lemft/v1/openApi/card/order/getOrder", json=lemft_body(order_id)
    )


@pytest.mark.parametrize("provider", ["lemft", "lunpay", "kasushou"])
async def test_missing_ids_answers_not_found_for_an_order_it_has(
    sandbox: RunningSandbox, http: httpx.AsyncClient, provider: str
) -> None:
    box = sandbox.sandbox
    account: Account = sandbox.accounts[provider]
    hidden, other = (box.create_order(account.name, status=2) for _ in range(2))
    # Set through the control route, as a person trying the sandbox would.
    set_fault = await http.post(
        f"{sandbox.url}/_sandbox/faults/{account.name}", json={"missing_ids": [hidden.order_id]}
    )
    assert set_fault.json()["missing_ids"] == [hidden.order_id]
    assert box.faults(account.name) == Faults(missing_ids=(hidden.order_id,))

    # The provider's own answer for an order it does not know: the same bytes as for an
    # id it never had.
    hidden_answer = await signed_query(http, sandbox, provider, hidden.order_id)
    unknown_answer = await signed_query(http, sandbox, provider, "never-made-1")
    assert hidden_answer.status_code == unknown_answer.status_code == 200
    assert hidden_answer.json() == unknown_answer.json()
    with pytest.raises(OrderNotFound):
        await query_order(http, account, hidden.order_id)
    assert (await query_order(http, account, other.order_id)).order_id == other.order_id
    box.set_faults(account.name, Faults())
    assert (await query_order(http, account, hidden.order_id)).provider_status.code == 2

    assert [(q.order_ids, q.outcome) for q in box.queries] == [
        ((hidden.order_id,), "missing"),
        (("never-made-1",), "not_found" if provider != "kasushou" else "ok"),
        ((hidden.order_id,), "missing"),
        ((other.order_id,), "ok"),
        ((hidden.order_id,), "ok"),
    ]
    bad_setting = await http.post(
        f"{sandbox.url}/_sandbox/faults/{account.name}", json={"missing_ids": "x"}
    )
    assert bad_setting.status_code == 400


async def test_missing_ids_leaves_the_order_out_of_a_kasushou_batch(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    hidden, other = (box.create_order(KSU).order_id for _ in range(2))
    box.set_faults(KSU, Faults(missing_ids=(hidden,)))
    batch = await kasushou_post(http, sandbox, ordersn_body(f"{other},{hidden}"))
    assert [o["ordersn"] for o in batch.json()["data"]] == [other]
    assert [q.outcome for q in box.queries] == ["missing"]


async def test_stale_rate_answers_the_previous_status(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    order = box.create_order(KSU)
    box.set_faults(KSU, Faults(stale_rate=1.0))

    async def shown_status() -> int:
        response = await kasushou_post(http, sandbox, ordersn_body(order.order_id))
        status: int = response.json()["data"][0]["status"]
        return status

    assert await shown_status() == 1  # nothing older to show
    box.set_status(KSU, order.order_id, 2)
    assert await shown_status() == 1
    box.set_status(KSU, order.order_id, 3)
    assert await shown_status() == 2
    box.set_faults(KSU, Faults())
    assert await shown_status() == 3
    assert [q.outcome for q in box.queries] == ["ok", "stale", "stale", "ok"]


# -- bookkeeping and control routes ------------------------------------------------------


async def test_query_count_counts_single_and_batched_queries(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    box = sandbox.sandbox
    a, b = box.create_order(KSU), box.create_order(KSU)
    await kasushou_post(http, sandbox, ordersn_body(a.order_id))
    await kasushou_post(http, sandbox, ordersn_body(f"{a.order_id},{b.order_id}"))
    await kasushou_post(http, sandbox, ordersn_body(a.order_id), key="wrong")
    assert box.query_count(KSU, a.order_id) == 3
    assert box.query_count(KSU, b.order_id) == 1
    assert box.query_count(LEM, a.order_id) == 0


async def test_control_routes(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    received: list[tuple[bytes, str]] = []

    async def receiver(request: Request) -> Response:
        received.append((await request.body(), request.headers["content-type"]))
        return PlainTextResponse("ok")

    base = f"{sandbox.url}/_sandbox"
    created = await http.post(
        f"{base}/orders", json={"account": KSU, "status": 2, "amount": "5.50", "currency": "CNY"}
    )
    assert created.status_code == 201
    order = created.json()
    assert (order["status"], order["amount"], order["currency"]) == (2, "5.50", "CNY")

    updated = await http.post(f"{base}/orders/{KSU}/{order['order_id']}", json={"status": 3})
    assert updated.status_code == 200
    assert updated.json()["status_history"] == [2, 3]
    assert sandbox.sandbox.order(KSU, order["order_id"]).status == 3

    listed = await http.get(f"{base}/orders")
    assert [o["order_id"] for o in listed.json()] == [order["order_id"]]
    for secret in SECRETS:
        assert secret not in listed.text

    async with serve(Starlette(routes=[Route("/cb", receiver, methods=["POST"])])) as url:
        posted = await http.post(
            f"{base}/callbacks",
            json={
                "account": KSU,
                "order_id": order["order_id"],
                "url": f"{url}/cb",
                "encoding": "form",
            },
        )
    assert posted.json() == {"status_code": 200, "body": "ok"}
    ((body, content_type),) = received
    assert content_type == "application/x-www-form-urlencoded"
    assert dict(urllib.parse.parse_qsl(body.decode()))["status"] == "3"

    assert (await http.post(f"{base}/orders", json={"account": "nope"})).status_code == 404
    assert (await http.post(f"{base}/orders/{KSU}/nope", json={"status": 1})).status_code == 404
    assert (
        await http.post(f"{base}/orders", json={"account": KSU, "status": "x"})
    ).status_code == 400
    faults = await http.post(f"{base}/faults/{KSU}", json={"latency": 0.5, "down": True})
    assert faults.status_code == 200
    assert sandbox.sandbox.faults(KSU) == Faults(latency=0.5, down=True)


# -- the bridge's adapters against the sandbox -------------------------------------------


@pytest.mark.parametrize("provider", ["lemft", "lunpay", "kasushou"])
async def test_adapters_confirm_sandbox_orders(
    sandbox: RunningSandbox, http: httpx.AsyncClient, provider: str
) -> None:
    account: Account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name, amount=Decimal("375.28"))
    snapshot = await query_order(http, account, order.order_id)
    assert snapshot.order_id == order.order_id
    assert snapshot.amount == Decimal("375.28")
    assert snapshot.provider_status.code == order.status


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_kasushou_adapter_accepts_sandbox_callbacks(
    sandbox: RunningSandbox, encoding: Any
) -> None:
    account = sandbox.accounts["kasushou"]
    order = sandbox.sandbox.create_order(KSU, status=3)
    body, content_type = sandbox.sandbox.callback(KSU, order.order_id, encoding=encoding)
    hint = providers.get("kasushou").parse_callback(account, body, {"content-type": content_type})
    assert (hint.order_id, hint.signature_rule) == (order.order_id, "callback")


def test_wire_json_is_json_dumps_with_exact_decimals() -> None:
    value = {
        "s": 'a"b\\c\n\x01日本\u2028',
        "n": [None, True, False, 0, -7, 2**70, 1.5, Decimal("0.40")],
        1: {"nested": [], "empty": {}},
    }
    expected = json.dumps(
        {**value, "n": [None, True, False, 0, -7, 2**70, 1.5, 0.4]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert wire.dumps(value).decode() == expected.replace("0.4]", "0.40]")
