"""lemft: the query, the documented answer, error envelopes and callbacks (no network)."""

from __future__ import annotations

import json
import urllib.parse
from decimal import Decimal

import pytest

from bridge.errors import (
    InvalidAnswer,
    MalformedCallback,
    MismatchedAnswer,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    UnsupportedMediaType,
)
from bridge.orders import Status
from bridge.providers.lemft import PROVIDER
from tests.helpers import (
    GARBAGE,
    LEMFT_KEY,
    PROXY_PAGE,
    PROXY_PAGE_200,
    answer,
    fixture,
    form_headers,
    json_headers,
    make_accounts,
)

ACCOUNT = make_accounts()["lemft"]


def test_query_carries_the_credentials_in_the_body() -> None:
    request = PROVIDER.build_query(ACCOUNT, ["ord_FL6Efqv7"])
    assert request.url == "http://sandbox.invalid/lemft/v1/openApi/card/order/getOrder"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "customer_id": 10000011,
        "app_id": 100001,
        "key": LEMFT_KEY,
        "order_id": "ord_FL6Efqv7",
    }
    assert LEMFT_KEY not in repr(request)


def test_documented_example_keeps_amounts_exact() -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["ord_MEP9vKJi"], answer(fixture("lemft_order_detail.json"))
    )
    assert snapshot.order_id == "ord_MEP9vKJi"
    assert snapshot.external_order_id == "out_10002000004"
    assert snapshot.status is Status.SUCCEEDED
    assert (snapshot.provider_status.code, snapshot.provider_status.label) == (1, "completed")
    assert snapshot.amount == Decimal("20")
    assert snapshot.currency == "USD"
    assert snapshot.details["fee"] == "0.4"
    assert snapshot.details["card_id"] == "cid_YqcDBySrmt9iLFJy"
    assert snapshot.details["complete_at"] == "2025-02-19 05:33:57"
    bills = snapshot.details["bills"][0]["bill_list"]
    assert [b["amount"] for b in bills] == ["20", "0.4"]
    assert snapshot.to_json()["amount"] == "20"


def order(status: object = 0, order_id: str = "ord_1", amount: bytes = b"12.30") -> bytes:
    return (
        b'{"code":0,"message":"success","data":{"order_info":{"order_id":"'
        + order_id.encode()
        + b'","out_order_id":"o-1","amount":'
        + amount
        + b',"fee":0.1,"currency":"USD","status":'
        + json.dumps(status).encode()
        + b'},"order_bill_list":[]}}'
    )


@pytest.mark.parametrize(
    ("code", "status", "label"),
    [
        (0, Status.PROCESSING, "processing"),
        (1, Status.SUCCEEDED, "completed"),
        (2, Status.REFUNDED, "refunded"),
        (3, Status.FAILED, "abnormal"),
        (4, Status.ON_HOLD, "under_review"),
    ],
)
def test_every_status_code(code: int, status: Status, label: str) -> None:
    (snapshot,) = PROVIDER.parse_query(ACCOUNT, ["ord_1"], answer(order(code)))
    assert snapshot.status is status
    assert snapshot.provider_status.label == label
    assert snapshot.amount == Decimal("12.30")


def test_unknown_status_code_is_kept_raw() -> None:
    (snapshot,) = PROVIDER.parse_query(ACCOUNT, ["ord_1"], answer(order(7)))
    assert snapshot.status is Status.UNKNOWN
    assert snapshot.provider_status.code == 7


def test_float_amount_stays_exact() -> None:
    (snapshot,) = PROVIDER.parse_query(ACCOUNT, ["ord_1"], answer(order(amount=b"0.4")))
    assert str(snapshot.amount) == "0.4"


@pytest.mark.parametrize("data", [{}, None, {"order_info": None, "order_bill_list": []}])
def test_answer_without_the_order_means_not_found(data: object) -> None:
    response = answer({"code": 0, "message": "success", "data": data})
    assert PROVIDER.parse_query(ACCOUNT, ["ord_1"], response) == []


@pytest.mark.parametrize(
    ("response", "error", "transient"),
    [
        (answer({"code": 10001, "message": "invalid key", "data": None}), ProviderRejected, False),
        (answer(order(order_id="ord_other")), MismatchedAnswer, True),
        (answer({"code": 0, "data": "x"}), InvalidAnswer, True),
        (answer(order(amount=b'"abc"')), InvalidAnswer, True),
        (PROXY_PAGE, ProviderUnavailable, True),
        (PROXY_PAGE_200, InvalidAnswer, True),
        (GARBAGE, InvalidAnswer, True),
        (answer(b"", 429, "text/plain"), ProviderUnavailable, True),
    ],
)
def test_error_answers(response: object, error: type[ProviderError], transient: bool) -> None:
    with pytest.raises(error) as caught:
        PROVIDER.parse_query(ACCOUNT, ["ord_1"], response)  # type: ignore[arg-type]
    assert caught.value.transient is transient
    assert "lemft/lemft-test order ord_1" in str(caught.value)


CARD_CALLBACK = {
    "card_id": "cid_1",
    "order_id": "ord_1",
    "out_order_id": "o-1",
    "app_id": 100001,
    "card_no": "4111111111111111",
    "balance": 20.5,
    "cvv": "123",
    "pin": "9876",
    "status": "active",
    "mark": "card.status.active",
}


def test_json_callback_names_the_order_and_masks_card_secrets() -> None:
    hint = PROVIDER.parse_callback(ACCOUNT, json.dumps(CARD_CALLBACK).encode(), json_headers())
    assert hint.order_id == "ord_1"
    assert hint.claimed_status == "active"
    stored = json.loads(hint.stored_body)
    assert stored["card_no"] == "************1111"
    assert stored["cvv"] == "******"
    assert stored["pin"] == "******"
    assert stored["balance"] == 20.5
    for secret in (b"4111111111111111", b'"123"', b"9876"):
        assert secret not in hint.stored_body


def test_form_callback_is_accepted_too() -> None:
    body = urllib.parse.urlencode(CARD_CALLBACK).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, form_headers())
    assert hint.order_id == "ord_1"
    assert b"4111111111111111" not in hint.stored_body
    assert b"9876" not in hint.stored_body


def test_a_repeated_secret_key_is_masked_in_every_occurrence() -> None:
    body = b"order_id=ord_1&cvv=123&cvv=&pin=9876&pin="
    hint = PROVIDER.parse_callback(ACCOUNT, body, form_headers())
    assert b"123" not in hint.stored_body
    assert b"9876" not in hint.stored_body


@pytest.mark.parametrize("depth", [5, 600, 2000])
def test_json_in_a_form_value_is_masked_however_deep(depth: int) -> None:
    cards = "[" * depth + '{"cvv": "777"}' + "]" * depth
    body = urllib.parse.urlencode({"order_id": "ord_1", "card_list": cards}).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, form_headers())
    assert b"777" not in hint.stored_body


def nested(depth: int) -> bytes:
    return b'{"order_id": "o", "x": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("body", "headers", "error", "status"),
    [
        (b'{"card_id": "x"}', json_headers(), MalformedCallback, 400),
        (b"{not json", json_headers(), MalformedCallback, 400),
        (nested(40), json_headers(), MalformedCallback, 400),
        (nested(5000), json_headers(), MalformedCallback, 400),
        (b"[1, 2]", json_headers(), MalformedCallback, 400),
        (b"order_id=ord_1", {"content-type": "text/plain"}, UnsupportedMediaType, 415),
        (b"order_id=ord_1", {}, UnsupportedMediaType, 415),
        (b"\xff\xfe=1", form_headers(), MalformedCallback, 400),
    ],
)
def test_callbacks_that_can_never_be_accepted(
    body: bytes, headers: dict[str, str], error: type[Exception], status: int
) -> None:
    with pytest.raises(error) as caught:
        PROVIDER.parse_callback(ACCOUNT, body, headers)
    assert caught.value.status_code == status  # type: ignore[attr-defined]
