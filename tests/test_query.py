"""Each adapter against its sandbox provider, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from bridge.accounts import Account, Secret
from bridge.errors import (
    InvalidAnswer,
    OrderNotFound,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from bridge.orders import Status
from bridge.providers.client import ProviderClient
from bridge.query import MAX_ANSWER_BYTES, Http, query_order, query_orders
from bridge.sandbox import Faults
from tests.conftest import RunningSandbox
from tests.helpers import SECRETS, make_accounts

PROVIDERS = ["lemft", "lunpay", "kasushou"]


Client = Callable[[], Http]


@pytest.fixture(params=["provider-client", "httpx"])
def provider_client(request: pytest.FixtureRequest) -> Client:
    """The worker's client, or httpx's (the CLI's)."""
    if request.param == "httpx":
        return httpx.AsyncClient
    return lambda: ProviderClient("order-bridge/test")


# Each provider's code for "succeeded".
SUCCEEDED = {"lemft": 1, "lunpay": 4, "kasushou": 3}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_query_confirms_the_order_and_follows_its_changes(
    sandbox: RunningSandbox, provider: str, provider_client: Client
) -> None:
    account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name, amount=Decimal("375.28"), currency="USD")
    async with provider_client() as http:
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
    sandbox: RunningSandbox, provider: str, provider_client: Client
) -> None:
    account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name)
    secret_field = {"lemft": "key", "lunpay": "secret", "kasushou": "api_key"}[provider]
    wrong = dataclasses.replace(
        account,
        settings=dataclasses.replace(account.settings, **{secret_field: Secret("wrong")}),
    )
    async with provider_client() as http:
        with pytest.raises(ProviderRejected) as caught:
            await query_order(http, wrong, order.order_id)
    assert caught.value.transient is False
    assert_no_secret(caught.value)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_unknown_order(
    sandbox: RunningSandbox, provider: str, provider_client: Client
) -> None:
    async with provider_client() as http:
        with pytest.raises(OrderNotFound) as caught:
            await query_order(http, sandbox.accounts[provider], "NO-SUCH-ORDER")
    assert caught.value.transient is False
    assert "NO-SUCH-ORDER" in str(caught.value)


async def test_kasushou_batch_is_one_query(
    sandbox: RunningSandbox, provider_client: Client
) -> None:
    account = sandbox.accounts["kasushou"]
    ids = [sandbox.sandbox.create_order(account.name).order_id for _ in range(3)]
    async with provider_client() as http:
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
    sandbox: RunningSandbox,
    provider: str,
    faults: Faults,
    problem: str,
    provider_client: Client,
) -> None:
    account = dataclasses.replace(sandbox.accounts[provider], query_timeout=0.3)
    order = sandbox.sandbox.create_order(account.name)
    sandbox.sandbox.set_faults(account.name, faults)
    async with provider_client() as http:
        for _ in range(3):  # error_rate rotates through its kinds of failure
            with pytest.raises(ProviderError) as caught:
                await query_order(http, account, order.order_id)
            assert caught.value.transient is True
            assert problem in str(caught.value)
            assert_no_secret(caught.value)


async def test_unreachable_provider(provider_client: Client) -> None:
    account = Account(
        name="gone",
        provider="lunpay",
        base_url="http://127.0.0.1:9",
        settings=make_accounts()["lunpay"].settings,
    )
    async with provider_client() as http:
        with pytest.raises(ProviderUnavailable, match="unreachable") as caught:
            await query_order(http, account, "LP-1")
    assert caught.value.transient is True


Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_provider(answer: Answer) -> AsyncIterator[str]:
    """A loopback HTTP server that reads a request, then lets `answer` write what it likes."""

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def drip(writer: asyncio.StreamWriter) -> None:
    """Headers at once, then a byte now and then: each read is quick, the answer never ends."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    for _ in range(100):
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.1)


async def flood(writer: asyncio.StreamWriter) -> None:
    size = MAX_ANSWER_BYTES + 1
    writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode())
    writer.write(b" " * size)
    await writer.drain()


@pytest.mark.parametrize(
    ("answer", "timeout", "error", "problem"),
    [
        (drip, 0.5, ProviderUnavailable, "no answer within 0.5s"),
        (flood, 30, InvalidAnswer, f"answer over {MAX_ANSWER_BYTES} bytes"),
    ],
)
async def test_an_answer_must_end_in_time_and_within_a_size(
    answer: Answer,
    timeout: float,
    error: type[ProviderError],
    problem: str,
    provider_client: Client,
) -> None:
    async with raw_provider(answer) as url, provider_client() as http:
        lunpay = make_accounts()["lunpay"]
        account = dataclasses.replace(lunpay, base_url=url, query_timeout=timeout)
        with pytest.raises(error, match=problem) as caught:
            await query_order(http, account, "LP-1")
    assert caught.value.transient is True


def json_answer(body: object) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        content = orjson.dumps(body)
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(content)}"
        )
        writer.write(head.encode() + b"\r\nconnection: close\r\n\r\n" + content)
        await writer.drain()

    return answer


# Each provider's error envelope, around a message of the provider's choosing.
ERROR_ENVELOPES = {
    "lemft": lambda text: {"code": 1001, "message": text},
    "lunpay": lambda text: {"code": 403, "msg": text},
    "kasushou": lambda text: {"code": 400, "msg": text},
}
CARD_KEY = "Y2FyZC1rZXktZm9yLXRoZS1zY3J1YmJpbmctdGVzdCE="


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_provider_errors_never_echo_the_accounts_secrets(
    provider: str, provider_client: Client
) -> None:
    base = dataclasses.replace(make_accounts()[provider], card_key=Secret(CARD_KEY))
    (own,) = [s for s in base.secrets() if s != CARD_KEY]
    code = ERROR_ENVELOPES[provider]("")["code"]
    # An echo of what was sent, and one the adapter cuts off inside the secret.
    cases = {
        f"bad credentials {own} (card key {CARD_KEY})": "bad credentials ****** (card key ******)",
        "x" * 190 + own: "x" * 190 + "******",
    }
    for text, shown in cases.items():
        async with raw_provider(json_answer(ERROR_ENVELOPES[provider](text))) as url:
            account = dataclasses.replace(base, base_url=url)
            async with provider_client() as http:
                with pytest.raises(ProviderRejected) as caught:
                    await query_order(http, account, "ORD-1")
        assert str(caught.value) == f"{provider}/{account.name} order ORD-1: code {code}: {shown}"
        assert_no_secret(caught.value)
        assert CARD_KEY not in f"{caught.value!r} {vars(caught.value)}"


def assert_no_secret(error: Exception) -> None:
    text = f"{error} {error!r} {vars(error)}"
    for secret in SECRETS:
        assert secret not in text
