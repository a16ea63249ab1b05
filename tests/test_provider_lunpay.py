"""lunpay: the signed query, the documented answers and callbacks (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from decimal import Decimal

import pytest

from bridge.errors import InvalidAnswer, ProviderError, ProviderRejected, ProviderUnavailable
from bridge.orders import Status
from bridge.providers.lunpay import PROVIDER, LunpaySettings
from tests.helpers import (
    LUNPAY_SECRET,
    PROXY_PAGE,
    answer,
    fixture,
    form_headers,
    json_headers,
    make_accounts,
)

ACCOUNT = make_accounts()["lunpay"]
SIGNED = f"M1001A77LP-20951{LUNPAY_SECRET}"


def with_digest(digest: str) -> object:
    settings = dataclasses.replace(ACCOUNT.settings, sign_digest=digest)
    return dataclasses.replace(ACCOUNT, settings=settings)


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        ("md5", hashlib.md5(SIGNED.encode()).hexdigest()),
        ("sha256", hashlib.sha256(SIGNED.encode()).hexdigest()),
        ("none", SIGNED),
    ],
)
def test_sign_concatenates_merchant_account_order_secret(digest: str, expected: str) -> None:
    request = PROVIDER.build_query(with_digest(digest), ["LP-20951"])  # type: ignore[arg-type]
    assert request.url == "http://sandbox.invalid/lunpay/api/order/query"
    assert json.loads(request.content) == {
        "account_id": "A77",
        "merchant_id": "M1001",
        "order_no": "LP-20951",
        "sign": expected,
    }


def test_md5_is_the_default_digest() -> None:
    assert LunpaySettings("M", "A", ACCOUNT.settings.secret).sign_digest == "md5"


def test_documented_success_answer() -> None:
    (snapshot,) = PROVIDER.parse_query(
        ACCOUNT, ["LP-20951"], answer(fixture("lunpay_query_success.json"))
    )
    assert snapshot.order_id == "LP-20951"
    assert snapshot.status is Status.PROCESSING
    assert (snapshot.provider_status.code, snapshot.provider_status.label) == (0, "in_progress")
    assert snapshot.amount == Decimal("375.28")
    assert snapshot.currency == "USD"
    assert snapshot.details == {"third_a_id": "20951", "third_b_id": "0"}


def test_documented_failure_answer() -> None:
    with pytest.raises(ProviderRejected, match="code 403: error msg") as caught:
        PROVIDER.parse_query(ACCOUNT, ["LP-1"], answer(fixture("lunpay_query_failure.json")))
    assert caught.value.transient is False


@pytest.mark.parametrize(
    ("code", "status", "label"),
    [
        (0, Status.PROCESSING, "in_progress"),
        (1, Status.PENDING, "awaiting_payment"),
        (2, Status.PROCESSING, "processing"),
        (3, Status.ON_HOLD, "on_hold"),
        (4, Status.SUCCEEDED, "completed"),
        (5, Status.CANCELLED, "cancelled"),
        (6, Status.REFUNDED, "refunded"),
        (7, Status.FAILED, "failed"),
        (8, Status.PENDING, "draft"),
        (9, Status.PARTIALLY_PAID, "partially_paid"),
    ],
)
def test_every_status_code(code: int, status: Status, label: str) -> None:
    data = {"status": code, "currency": "EUR", "total": "0.40", "third_a_id": "1"}
    (snapshot,) = PROVIDER.parse_query(ACCOUNT, ["LP-1"], answer({"code": 200, "data": data}))
    assert snapshot.status is status
    assert snapshot.provider_status.label == label
    assert str(snapshot.amount) == "0.40"


def test_unknown_status_code_is_kept_raw() -> None:
    data = {"status": 10, "currency": "USD", "total": "1"}
    (snapshot,) = PROVIDER.parse_query(ACCOUNT, ["LP-1"], answer({"code": 200, "data": data}))
    assert snapshot.status is Status.UNKNOWN
    assert snapshot.provider_status.code == 10


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (answer({"code": 200, "data": ["x"]}), InvalidAnswer),
        (answer({"code": 200, "data": {"status": 1, "total": "abc"}}), InvalidAnswer),
        (PROXY_PAGE, ProviderUnavailable),
        (answer(b"", 503, "text/html"), ProviderUnavailable),
    ],
)
def test_error_answers(response: object, error: type[ProviderError]) -> None:
    with pytest.raises(error) as caught:
        PROVIDER.parse_query(ACCOUNT, ["LP-1"], response)  # type: ignore[arg-type]
    assert caught.value.transient is True


@pytest.mark.parametrize("message", ["order not found", "Order does not exist", "订单不存在"])
def test_403_saying_the_order_is_missing_means_not_found(message: str) -> None:
    response = answer({"code": 403, "msg": message})
    assert PROVIDER.parse_query(ACCOUNT, ["LP-1"], response) == []


def test_empty_data_means_not_found() -> None:
    assert PROVIDER.parse_query(ACCOUNT, ["LP-1"], answer({"code": 200, "data": None})) == []


@pytest.mark.parametrize("field", ["order_no", "order_id"])
def test_callback_names_the_order(field: str) -> None:
    body = json.dumps({field: "LP-7", "status": "4", "total": "1.00"}).encode()
    hint = PROVIDER.parse_callback(ACCOUNT, body, json_headers())
    assert (hint.order_id, hint.claimed_status, hint.stored_body) == ("LP-7", "4", body)


def test_form_callback() -> None:
    body = b"order_no=LP-8&status=4"
    hint = PROVIDER.parse_callback(ACCOUNT, body, form_headers())
    assert hint.order_id == "LP-8"
    assert hint.content_type == "application/x-www-form-urlencoded"
