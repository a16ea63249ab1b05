"""kasushou: request signing, answers, error envelopes and signed callbacks (no network)."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from decimal import Decimal

import pytest

from bridge.accounts import Secret
from bridge.errors import (
    BadSignature,
    InvalidAnswer,
    MismatchedAnswer,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from bridge.orders import Status
from bridge.providers.kasushou import PROVIDER, request_body, sign
from tests.helpers import (
    GARBAGE,
    KASUSHOU_API_KEY,
    PROXY_PAGE,
    answer,
    fixture,
    form_headers,
    json_headers,
    make_accounts,
)

ACCOUNT = make_accounts()["kasushou"]


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_documented_signing_vector() -> None:
    body = request_body({"ordersn": "D100759082558859640832", "day": 10, "external_orderno": ""})
    assert body == b'{"day":10,"external_orderno":"","ordersn":"D100759082558859640832"}'
    key = Secret("H0YnuPpcVtx7rQdMTbjN6932s5oDOqFa")
    assert sign("1696645385740", body.decode(), key) == "15b8f541eb10e3fbb33efd92c8d52d50ddca0784"


def test_request_body_leaves_non_ascii_and_slashes_unescaped() -> None:
    body = request_body({"ordersn": "D1", "external_orderno": "充值/卡 2"})
    assert body == '{"external_orderno":"充值/卡 2","ordersn":"D1"}'.encode()


def test_empty_body_is_sent_as_braces() -> None:
    assert request_body({}) == b"{}"


def test_query_is_signed_over_the_bytes_sent() -> None:
    request = PROVIDER.build_query(ACCOUNT, ["D1/x", "D2充值"])
    assert request.url == "http://sandbox.invalid/kasushou/api/v1/order/info"
    timestamp = request.headers["Timestamp"]
    assert len(timestamp) == 13
    assert timestamp.isdigit()
    assert request.headers["UserId"] == "10000"
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    expected = sha1(timestamp + request.content.decode() + KASUSHOU_API_KEY)
    assert request.headers["Sign"] == expected
    assert json.loads(request.content) == {
        "day": 0,
        "external_orderno": "",
        "ordersn": "D1/x,D2充值",
    }
    assert KASUSHOU_API_KEY not in repr(request)


def test_virtual_goods_example_from_the_docs() -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["D100759324935205552128"], answer(fixture("kasushou_virtual_goods.json"))
    )
    assert snapshot.order_id == "D100759324935205552128"
    assert snapshot.status is Status.REFUNDED
    assert snapshot.provider_status.code == 5
    assert snapshot.provider_status.label == "refunded"
    assert snapshot.amount is None
    assert snapshot.currency == "CNY"
    assert snapshot.details["recharge_info"][0] == {"n": "测试1", "v": "1", "k": "recharge_account"}
    assert snapshot.details["recharge_hints"] == "订单已取消,资金已退回商城余额!"


def test_card_code_example_masks_the_card_password() -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["D100759274105949519872"], answer(fixture("kasushou_card_codes.json"))
    )
    (card,) = snapshot.details["card_list"]
    assert card["card_password"] == "******"
    assert card["card_no"] == ""
    assert card["card_show_type"] == 1


def item(order_id: str = "D1", status: object = 3, **extra: object) -> dict[str, object]:
    return {
        "ordersn": order_id,
        "external_orderno": "EXT-1",
        "recharge_info": [],
        "recharge_hints": "",
        "status": status,
        "total_price": "375.28",
        "has_back_money": "0.00",
        "card_list": [],
        **extra,
    }


@pytest.mark.parametrize(
    ("code", "status", "label"),
    [
        (-1, Status.PENDING, "unpaid"),
        (1, Status.PENDING, "waiting"),
        (2, Status.PROCESSING, "processing"),
        (3, Status.SUCCEEDED, "succeeded"),
        (4, Status.CANCELLED, "cancelled"),
        (5, Status.REFUNDED, "refunded"),
        ("3", Status.SUCCEEDED, "succeeded"),
    ],
)
def test_every_status_code(code: object, status: Status, label: str) -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["D1"], answer({"code": 200, "data": [item(status=code)]})
    )
    assert snapshot.status is status
    assert snapshot.provider_status.label == label
    assert snapshot.amount == Decimal("375.28")
    assert snapshot.external_order_id == "EXT-1"


@pytest.mark.parametrize("code", [0, 6, 42, "x"])
def test_unknown_status_code_is_kept_raw(code: object) -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["D1"], answer({"code": 200, "data": [item(status=code)]})
    )
    assert snapshot.status is Status.UNKNOWN
    assert snapshot.provider_status.code == code


def test_batch_answer_gives_every_order_found() -> None:
    data = [item("D1", 2), item("D3", 5, has_back_money="375.28")]
    snapshots = PROVIDER.parse_query(
        ACCOUNT, ["D1", "D2", "D3"], answer({"code": 200, "data": data})
    )
    assert [(s.order_id, s.status) for s in snapshots] == [
        ("D1", Status.PROCESSING),
        ("D3", Status.REFUNDED),
    ]
    assert snapshots[1].details["has_back_money"] == "375.28"


def test_empty_data_list_means_not_found() -> None:
    assert PROVIDER.parse_query(ACCOUNT, ["D1"], answer({"code": 200, "data": []})) == []


@pytest.mark.parametrize(
    ("response", "error", "transient"),
    [
        (answer({"code": 400, "msg": "签名错误"}), ProviderRejected, False),
        (answer({"code": 500, "msg": "未知错误"}), ProviderUnavailable, True),
        (answer({"code": 200, "data": [item("D9")]}), MismatchedAnswer, True),
        (answer({"code": 200, "data": "nope"}), MismatchedAnswer, True),
        (answer({"code": 200, "data": [item(total_price="12,5")]}), InvalidAnswer, True),
        (PROXY_PAGE, ProviderUnavailable, True),
        (GARBAGE, InvalidAnswer, True),
        (answer(b"{}", 404), ProviderRejected, False),
    ],
)
def test_error_answers(response: object, error: type[ProviderError], transient: bool) -> None:
    with pytest.raises(error) as caught:
        PROVIDER.parse_query(ACCOUNT, ["D1"], response)  # type: ignore[arg-type]
    assert caught.value.transient is transient
    assert caught.value.order_ids == ["D1"]
    assert "kasushou/kasushou-test order D1" in str(caught.value)


def test_provider_message_is_kept_in_the_error() -> None:
    with pytest.raises(ProviderRejected, match="code 400: 签名错误"):
        PROVIDER.parse_query(ACCOUNT, ["D1"], answer({"code": 400, "msg": "签名错误"}))


# A callback as the docs describe it. The signed JSON below is written by hand, in the
# callback rule's form: keys sorted, no spaces, non-ASCII as is, "/" written as "\/".
CALLBACK = {
    "ordersn": "D100759274105949519872",
    "external_orderno": "",
    "status": "3",
    "has_back_money": "0.00",
    "total_price": "10.00",
    "recharge_hints": "充值成功 / ok",
    "time": "1700000000000",
}
SIGNED_JSON = (
    '{"external_orderno":"","has_back_money":"0.00","ordersn":"D100759274105949519872",'
    '"recharge_hints":"充值成功 \\/ ok","status":"3","time":"1700000000000","total_price":"10.00"}'
)
CARDS = [{"card_no": "6212345678901234", "card_password": "p@ss-1234", "card_show_type": 1}]


def signed_callback(rule: str = "callback") -> dict[str, object]:
    signed = SIGNED_JSON if rule == "callback" else SIGNED_JSON.replace("\\/", "/")
    return {**CALLBACK, "sign": sha1("1700000000000" + signed + KASUSHOU_API_KEY)}


def test_json_callback_signed_by_the_callback_rule() -> None:
    body = json.dumps({**signed_callback(), "card_list": CARDS}, ensure_ascii=False).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, json_headers())
    assert hint.order_id == "D100759274105949519872"
    assert hint.claimed_status == "3"
    assert hint.signature_rule == "callback"
    stored = json.loads(hint.stored_body)
    assert stored["card_list"][0]["card_password"] == "******"
    assert stored["card_list"][0]["card_no"] == "************1234"
    assert stored["recharge_hints"] == "充值成功 / ok"
    assert b"p@ss-1234" not in hint.stored_body
    assert b"6212345678901234" not in hint.stored_body


def test_form_callback_with_card_list_as_json_text() -> None:
    fields = {**signed_callback(), "card_list": json.dumps(CARDS)}
    body = urllib.parse.urlencode(fields).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, form_headers())
    assert hint.signature_rule == "callback"
    stored = dict(urllib.parse.parse_qsl(hint.stored_body.decode()))
    assert json.loads(stored["card_list"])[0]["card_password"] == "******"
    assert "p@ss-1234" not in hint.stored_body.decode()


def test_callback_signed_by_the_request_rule_is_accepted_and_says_so() -> None:
    body = json.dumps(signed_callback("request")).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, json_headers())
    assert hint.signature_rule == "request"


def test_callback_without_secrets_is_stored_byte_for_byte() -> None:
    body = json.dumps(signed_callback()).encode()
    assert PROVIDER.parse_callback(ACCOUNT, body, json_headers()).stored_body == body


@pytest.mark.parametrize(
    "fields",
    [
        {**signed_callback(), "status": "5"},  # tampered after signing
        {**signed_callback(), "sign": "0" * 40},
        {k: v for k, v in signed_callback().items() if k != "sign"},
    ],
)
def test_callback_with_a_wrong_signature_is_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(BadSignature) as caught:
        PROVIDER.parse_callback(ACCOUNT, json.dumps(fields).encode(), json_headers())
    assert caught.value.status_code == 401
    assert KASUSHOU_API_KEY not in str(caught.value)
