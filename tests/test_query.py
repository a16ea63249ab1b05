"""Each adapter against its sandbox provider, over real HTTP on loopback."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import httpx
import pytest

from bridge.config import Account
from bridge.errors import (
    OrderNotFound,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from bridge.orders import Status
from bridge.query import query_order, query_orders
from bridge.redact import Secret
from bridge.sandbox import Faults
from tests.conftest import RunningSandbox
from tests.helpers import SECRETS, make_accounts

PROVIDERS = ["lemft", "lunpay", "kasushou"]
# Each provider's code for "succeeded".
SUCCEEDED = {"lemft": 1, "lunpay": 4, "kasushou": 3}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_query_confirms_the_order_and_follows_its_changes(
    sandbox: RunningSandbox, provider: str
) -> None:
    account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name, amount=Decimal("375.28"), currency="USD")
    async with httpx.AsyncClient() as http:
        first = await query_order(http, account, order.order_id)
        sandbox.sandbox.set_status(account.name, order.order_id, SUCCEEDED[provider])
        second = await query_order(http, account, order.order_id)
    assert first.key == f"{provider}/{account.name}/{order.order_id}"
    assert first.status in (Status.PENDING, Status.PROCESSING)
    assert first.amount == Decimal("375.28")
    assert second.status is Status.SUCCEEDED
    assert second.provider_status.code == SUCCEEDED[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_credentials_get_the_providers_error(
    sandbox: RunningSandbox, provider: str
) -> None:
    account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name)
    secret_field = {"lemft": "key", "lunpay": "secret", "kasushou": "api_key"}[provider]
    wrong = dataclasses.replace(
        account,
        settings=dataclasses.replace(account.settings, **{secret_field: Secret("wrong")}),
    )
    async with httpx.AsyncClient() as http:
        with pytest.raises(ProviderRejected) as caught:
            await query_order(http, wrong, order.order_id)
    assert caught.value.transient is False
    assert_no_secret(caught.value)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_unknown_order(sandbox: RunningSandbox, provider: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(OrderNotFound) as caught:
            await query_order(http, sandbox.accounts[provider], "NO-SUCH-ORDER")
    assert caught.value.transient is False
    assert "NO-SUCH-ORDER" in str(caught.value)


async def test_kasushou_batch_is_one_query(sandbox: RunningSandbox) -> None:
    account = sandbox.accounts["kasushou"]
    ids = [sandbox.sandbox.create_order(account.name).order_id for _ in range(3)]
    async with httpx.AsyncClient() as http:
        snapshots = await query_orders(http, account, [*ids, "D-UNKNOWN"])
    assert sorted(s.order_id for s in snapshots) == sorted(ids)
    assert len(sandbox.sandbox.queries) == 1


@pytest.mark.parametrize(
    ("faults", "problem"),
    [
        (Faults(error_rate=1.0), ""),
        (Faults(down=True), "HTTP 503"),
        (Faults(hang=True), "no answer within 0.3s"),
    ],
)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_failing_provider_gives_transient_errors(
    sandbox: RunningSandbox, provider: str, faults: Faults, problem: str
) -> None:
    account = dataclasses.replace(sandbox.accounts[provider], query_timeout=0.3)
    order = sandbox.sandbox.create_order(account.name)
    sandbox.sandbox.set_faults(account.name, faults)
    async with httpx.AsyncClient() as http:
        for _ in range(3):  # error_rate rotates through its kinds of failure
            with pytest.raises(ProviderError) as caught:
                await query_order(http, account, order.order_id)
            assert caught.value.transient is True
            assert problem in str(caught.value)
            assert_no_secret(caught.value)


async def test_unreachable_provider() -> None:
    account = Account(
        name="gone",
        provider="lunpay",
        base_url="http://127.0.0.1:9",
        settings=make_accounts()["lunpay"].settings,
    )
    async with httpx.AsyncClient() as http:
        with pytest.raises(ProviderUnavailable, match="unreachable") as caught:
            await query_order(http, account, "LP-1")
    assert caught.value.transient is True


def assert_no_secret(error: Exception) -> None:
    text = f"{error} {error!r} {vars(error)}"
    for secret in SECRETS:
        assert secret not in text
