"""The receiver over real HTTP, with a real broker and the sandbox providers.

What is asserted is what users see: the HTTP answers, and the records in the
inbox and dead-letter topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge import receiver as receiver_module
from bridge.broker import EmbeddedBroker
from bridge.config import Config, HttpSettings, KafkaSettings
from bridge.inbox import InboxRecord
from bridge.kafka import Producer, ensure_topics
from bridge.metrics import Metrics
from bridge.receiver import (
    BODY_LATE,
    UNAVAILABLE,
    Readiness,
    _headers,
    _kept_headers,
    create_app,
)
from bridge.sandbox import SandboxOrder
from bridge.sandbox.base import Encoding
from bridge.servers import serve
from tests.bridge_fixtures import RunningBridge
from tests.conftest import CutOffBroker, RunningSandbox, kafka_settings_for
from tests.kafka import Record, read_topic

LIMIT = 16 * 1024
RETRY_AFTER = 7
KSU, LEM, LUN = "kasushou-test", "lemft-test", "lunpay-test"
# A lunpay account that answers its callbacks with its own text.
LUN_CUSTOM = "lunpay-custom"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# A lemft order's card data, which its callbacks carry.
LEMFT_CARD = {"card_no": "6212345678901234", "cvv": "321", "pin": "8642"}
MULTIPART_TYPE = "multipart/form-data; boundary=xyz"
MULTIPART = (
    '--xyz\r\ncontent-disposition: form-data; name="order_id"\r\n\r\nL3\r\n'
    '--xyz\r\ncontent-disposition: form-data; name="card_password"\r\n\r\n{password}\r\n'
    "--xyz--\r\n"
)


@dataclass
class RunningReceiver:
    url: str
    http: httpx.AsyncClient
    config: Config
    sandbox: RunningSandbox
    # What the wiring's ready() reports; tests change it.
    problems: list[str] = field(default_factory=list)

    @property
    def kafka(self) -> KafkaSettings:
        return self.config.kafka

    def order(self, account: str, **fields: Any) -> SandboxOrder:
        return self.sandbox.sandbox.create_order(account, **fields)

    async def callback(
        self,
        account: str,
        order: SandboxOrder,
        *,
        encoding: Encoding = "json",
        bad_sign: bool = False,
        to_account: str | None = None,
    ) -> httpx.Response:
        """Posts the order's callback as its provider would, to `to_account` if given."""
        body, content_type = self.sandbox.sandbox.callback(
            account, order.order_id, encoding=encoding, bad_sign=bad_sign
        )
        path = f"/callbacks/{order.provider}/{to_account or account}"
        return await self.http.post(path, content=body, headers={"content-type": content_type})


class PassThrough:
    """A middleware that changes nothing: with it, callbacks go through Starlette."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def running_receiver(
    sandbox: RunningSandbox,
    settings: KafkaSettings,
    inbox_timeout: float = 5.0,
    through_starlette: bool = False,
    **http: Any,
) -> AsyncIterator[RunningReceiver]:
    """A receiver on the sandbox's accounts; `http` changes its HttpSettings. Callbacks
    take the receiver's direct path unless `through_starlette`."""
    custom = dataclasses.replace(
        sandbox.accounts["lunpay"], name=LUN_CUSTOM, callback_ack="SUCCESS-CUSTOM"
    )
    config = Config(
        kafka=settings,
        http=HttpSettings(
            max_body_bytes=LIMIT, inbox_timeout=inbox_timeout, retry_after=RETRY_AFTER, **http
        ),
        accounts=(*sandbox.accounts.values(), custom),
    )
    await ensure_topics(settings)
    producer = Producer(settings)
    await producer.start()
    problems: list[str] = []

    async def ready() -> Readiness:
        return Readiness(list(problems), [])

    app = create_app(config, producer, Metrics(), ready)
    if through_starlette:
        app.add_middleware(PassThrough)
    try:
        limits = config.http
        async with (
            serve(
                app, header_timeout=limits.header_timeout, idle_timeout=limits.idle_timeout
            ) as url,
            httpx.AsyncClient(base_url=url, timeout=20.0) as client,
        ):
            yield RunningReceiver(url, client, config, sandbox, problems)
    finally:
        await producer.stop()


@pytest.fixture
async def receiver(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> AsyncIterator[RunningReceiver]:
    async with running_receiver(sandbox, kafka_settings) as running:
        yield running


def order_key(order: SandboxOrder) -> str:
    return f"{order.provider}/{order.account}/{order.order_id}"


def keys(records: list[Record]) -> list[str]:
    return [r.key for r in records]


def text_of(record: Record) -> str:
    return orjson.dumps(record.value).decode()


def card_secrets(order: SandboxOrder) -> list[str]:
    """The secrets an order's callback carries in plain text."""
    secrets = [str(order.fields[k]) for k in ("card_no", "cvv", "pin") if order.fields.get(k)]
    for card in order.fields.get("card_list", []):
        secrets += [card["card_no"], card["card_password"]]
    return secrets


# -- accepted callbacks ------------------------------------------------------------------


async def test_callbacks_are_stored_then_acked(receiver: RunningReceiver) -> None:
    before = datetime.now(UTC)
    acks = {KSU: "ok", LEM: "success", LUN: "success", LUN_CUSTOM: "SUCCESS-CUSTOM"}
    sent: dict[str, SandboxOrder] = {}
    encodings: tuple[Encoding, ...] = ("json", "form")
    for account, to_account in [(KSU, KSU), (LEM, LEM), (LUN, LUN), (LUN, LUN_CUSTOM)]:
        for encoding in encodings:
            order = receiver.order(account, **(LEMFT_CARD if account == LEM else {}))
            response = await receiver.callback(
                account, order, encoding=encoding, to_account=to_account
            )
            assert response.status_code == 200, (to_account, encoding, response.text)
            assert response.text == acks[to_account]
            assert response.headers["content-type"].startswith("text/plain")
            sent[f"{order.provider}/{to_account}/{order.order_id}"] = order

    async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
        await inbox.wait_for(lambda rs: set(sent) <= set(keys(rs)), what="every callback")
        records = await inbox.quiet(0.2)
    assert sorted(keys(records)) == sorted(sent)  # exactly one record a callback
    for record in records:
        order, value = sent[record.key], record.value
        assert value["trigger"] == "callback"
        assert value["provider"] == order.provider
        assert value["order_id"] == order.order_id
        assert order.order_id in value["body"]
        assert value["headers"]["content-type"] == value["content_type"]
        assert value["headers"]["remote_addr"] == "127.0.0.1"
        assert ISO_UTC.fullmatch(value["received_at"])
        received = datetime.fromisoformat(value["received_at"])
        assert before - timedelta(seconds=1) <= received <= datetime.now(UTC)
        secrets = card_secrets(order)
        assert secrets or order.provider == "lunpay"  # lunpay callbacks carry no card data
        for secret in secrets:
            assert secret not in text_of(record), record.key
        if order.provider == "kasushou":
            assert value["signature_rule"]


# -- refused callbacks -------------------------------------------------------------------


async def test_bad_kasushou_signature_is_401_and_dead_lettered(receiver: RunningReceiver) -> None:
    orders = {}
    encodings: tuple[Encoding, ...] = ("json", "form")
    for encoding in encodings:
        order = receiver.order(KSU)
        response = await receiver.callback(KSU, order, encoding=encoding, bad_sign=True)
        assert response.status_code == 401
        assert "bad_signature" in response.text
        orders[order.order_id] = order

    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        records = await deadletters.wait_for_count(2)
    for record in records:
        assert record.key == f"kasushou/{KSU}"
        assert record.headers == {"reason": "bad_signature"}
        assert record.value["reason"] == "bad_signature"
        assert (record.value["provider"], record.value["account"]) == ("kasushou", KSU)
        # The body is kept for people to look at, its secrets masked.
        order = orders[record.value["order_id"]]
        assert order.order_id in record.value["body"]
        for secret in card_secrets(order):
            assert secret not in text_of(record)
    async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
        assert await inbox.quiet(0.2) == []


async def test_bodies_never_acceptable_are_refused(receiver: RunningReceiver) -> None:
    order = receiver.order(LUN)
    body, content_type = receiver.sandbox.sandbox.callback(LUN, order.order_id)
    for path, text in [
        ("/callbacks/lunpay/no-such-account", "unknown account\n"),
        ("/callbacks/kasushou/lunpay-test", "unknown account\n"),
        ("/callbacks/paypal/lunpay-test", "unknown provider\n"),
    ]:
        response = await receiver.http.post(
            path, content=body, headers={"content-type": content_type}
        )
        assert (response.status_code, response.text) == (404, text), path

    password = "4821-0937"
    json, form = "application/json", "application/x-www-form-urlencoded"
    cases = [
        # (account, body, content type, status, dead-letter reason)
        (LEM, f"order_id=L1&card_password={password}", "text/plain", 415, "unsupported_media_type"),
        (LEM, MULTIPART.format(password=password), MULTIPART_TYPE, 415, "unsupported_media_type"),
        (LEM, f'{{"order_id": "L2", "card_password": "{password}"', json, 400, "malformed"),
        (LUN, f'{{"card_password": "{password}"}}', json, 400, "malformed"),  # no order id
        (KSU, f"ordersn=K1&card_password={password}&%zz", form, 400, "malformed"),
    ]
    for account, body_text, content_type, status, reason in cases:
        response = await receiver.http.post(
            f"/callbacks/{account.split('-')[0]}/{account}",
            content=body_text,
            headers={"content-type": content_type},
        )
        assert response.status_code == status, (body_text, response.text)
        assert reason in response.text

    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        await deadletters.wait_for_count(len(cases))
        records = await deadletters.quiet(0.2)  # and none for the 404s
    assert len(records) == len(cases)
    for record in records:
        assert password not in text_of(record)
    # Other media types keep no body: masking only knows JSON and form encoding.
    refused = [r for r in records if r.value["reason"] == "unsupported_media_type"]
    assert len(refused) == 2
    assert all("body" not in r.value for r in refused)
    by_body = {r.value["body"].replace("******", ""): r for r in records if "body" in r.value}
    for account, body_text, _, status, reason in cases:
        if status == 415:
            continue
        record = by_body[body_text.replace(password, "")]
        assert record.key == f"{account.split('-')[0]}/{account}"
        assert record.value["reason"] == reason
    # The connection is still good for the next callback.
    assert (await receiver.callback(LUN, order)).status_code == 200


async def test_body_over_the_limit_is_413(receiver: RunningReceiver) -> None:
    response = await receiver.http.post(
        f"/callbacks/lemft/{LEM}",
        content=b"x" * (LIMIT + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * (LIMIT // 2)

    response = await receiver.http.post(
        f"/callbacks/kasushou/{KSU}", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "content-length" not in response.request.headers

    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        records = await deadletters.wait_for_count(2)
    details = {r.key: r.value["detail"] for r in records}
    assert str(LIMIT + 1) in details[f"lemft/{LEM}"]  # the size declared
    assert "reading stopped" in details[f"kasushou/{KSU}"]
    for record in records:
        assert record.value["reason"] == "too_large"
        assert "body" not in record.value


async def test_endless_body_is_refused_without_reading_it(receiver: RunningReceiver) -> None:
    # httpx sends the whole body before it reads the answer, so it can't see one that comes
    # early; this client reads while it sends, as curl does.
    answer, sent = await post_endless_body(receiver.url, f"/callbacks/lemft/{LEM}")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"connection: close" in answer.lower()
    assert sent < 64 * 1024 * 1024, sent  # of the 1 GiB offered


class _EarlyReader(asyncio.Protocol):
    def __init__(self) -> None:
        self.answer = bytearray()
        self.closed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.answer += data

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.writable.set()


async def post_endless_body(url: str, path: str) -> tuple[bytes, int]:
    """Posts a chunked body of up to 1 GiB, stopping once an answer comes; the answer and
    the body bytes sent until then."""
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_EarlyReader, host, int(port))
    transport.write(
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"x" * 65536
    sent = 0
    async with asyncio.timeout(20):
        while sent < 1 << 30 and not client.answer and not transport.is_closing():
            await client.writable.wait()
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        await client.closed.wait()  # the server hangs up
    transport.close()
    return bytes(client.answer), sent


# -- the direct path --------------------------------------------------------------------


async def test_callbacks_take_the_direct_path_as_they_would_starlettes_route(
    sandbox: RunningSandbox, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct path for callbacks against Starlette's router, which takes them to the
    callback route: the requests it takes are those the route would, and they get the
    same bytes back and leave the same records and metrics."""
    routed: list[str] = []
    route_call = receiver_module._CallbackRoute.__call__

    async def counted(route: Any, scope: Scope, receive: Receive, send: Send) -> None:
        routed.append(scope["path"])
        await route_call(route, scope, receive, send)

    monkeypatch.setattr(receiver_module._CallbackRoute, "__call__", counted)
    box = sandbox.sandbox
    card: dict[str, Any] = dict(LEMFT_CARD)
    orders = [box.create_order(LUN), box.create_order(KSU), box.create_order(LEM, **card)]
    encodings: tuple[Encoding, ...] = ("json", "form", "json")
    requests: list[tuple[str, str, bytes, dict[str, str]]] = []
    for order, encoding in zip(orders, encodings, strict=True):
        body, content_type = box.callback(order.account, order.order_id, encoding=encoding)
        path = f"/callbacks/{order.provider}/{order.account}"
        requests.append(("POST", path, body, {"content-type": content_type, "x-request-id": "r"}))
    lunpay_body, _ = box.callback(LUN, orders[0].order_id)
    bad_sign, form = box.callback(KSU, orders[1].order_id, encoding="form", bad_sign=True)
    json_type = {"content-type": "application/json"}
    requests += [
        ("POST", f"/callbacks/lunpay/{LUN_CUSTOM}", lunpay_body, json_type),
        ("POST", "/callbacks/lunpay/lunpay%2Dtest", lunpay_body, json_type),  # percent-encoded
        ("POST", "/callbacks/paypal/x", lunpay_body, json_type),
        ("POST", "/callbacks/lunpay/nope", lunpay_body, json_type),
        ("POST", f"/callbacks/kasushou/{KSU}", bad_sign, {"content-type": form}),
        ("POST", f"/callbacks/lemft/{LEM}", b'{"order_id": "L1", "cvv": "12', json_type),
        ("POST", f"/callbacks/lunpay/{LUN}", b'{"order_no": "a,b"}', json_type),
        ("POST", f"/callbacks/lemft/{LEM}", b"order_id=L2&cvv=123", {"content-type": "text/xml"}),
        ("POST", f"/callbacks/lemft/{LEM}", b"x" * (LIMIT + 1), json_type),  # closes
        ("GET", f"/callbacks/lunpay/{LUN}", b"", {}),
        ("POST", f"/callbacks/lunpay/{LUN}/", lunpay_body, json_type),
    ]

    seen: list[dict[str, list[Any]]] = []
    for through_starlette in (False, True):
        settings = kafka_settings_for(broker.bootstrap_servers)
        async with running_receiver(sandbox, settings, through_starlette=through_starlette) as rcv:
            answers = [await raw_exchange(rcv.url, *request) for request in requests]
            metrics = (await rcv.http.get("/metrics")).text
        assert len(routed) == (12 if through_starlette else 0)
        routed.clear()
        async with read_topic(settings, settings.inbox_topic) as inbox:
            stored = await inbox.wait_for_count(5)
        async with read_topic(settings, settings.deadletter_topic) as deadletters:
            refused = await deadletters.wait_for_count(5)
        seen.append(
            {
                "answers": answers,
                "inbox": sorted(without(r.value, "received_at") for r in stored),
                "deadletters": sorted(without(r.value, "at") for r in refused),
                "metrics": [
                    line
                    for line in metrics.splitlines()
                    if line.startswith(("order_bridge_callbacks_total", "order_bridge_deadlet"))
                ],
            }
        )
    direct, starlette = seen
    assert [a.split(b" ", 2)[1] for a in direct["answers"]] == [
        *[b"200"] * 5,
        b"404",
        b"404",
        b"401",
        b"400",
        b"400",
        b"415",
        b"413",
        b"405",
        b"307",
    ]
    assert direct == starlette


@pytest.mark.parametrize(
    ("status", "text", "headers"),
    [
        (200, "success", None),
        (200, "SUCCESS-CUSTOM", None),
        (404, "unknown provider\n", None),
        (503, f"{UNAVAILABLE}\n", {"retry-after": "5"}),
        (413, "too_large: body of 65537 bytes is over the limit\n", {"connection": "close"}),
        (408, BODY_LATE, {"connection": "close"}),
        (400, "", None),
        (200, "ackn\u00f6wledged \u2713", None),
    ],
)
async def test_answers_are_written_as_starlettes_plain_text_response_writes_them(
    status: int, text: str, headers: dict[str, str] | None
) -> None:
    def collect(into: list[Message]) -> Send:
        async def send(message: Message) -> None:
            into.append(message)

        return send

    async def nothing() -> Message:
        raise AssertionError("an answer reads nothing")

    ours: list[Message] = []
    starlettes: list[Message] = []
    await receiver_module._send_text(collect(ours), status, text, headers)
    response = PlainTextResponse(text, status, headers)
    await response({"type": "http", "method": "POST"}, nothing, collect(starlettes))
    assert ours == starlettes


def without(value: dict[str, Any], name: str) -> str:
    return orjson.dumps({k: v for k, v in value.items() if k != name}).decode()


async def raw_exchange(
    url: str, method: str, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """The answer to one request on a connection of its own, as bytes, its date left out."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(head.encode() + b"\r\n" + body)
    answer = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"\r\ncontent-length: (\d+)\r\n", answer)
    answer += await reader.readexactly(int(length[1]) if length else 0)
    writer.close()
    return re.sub(rb"\r\ndate: [^\r]*", b"", answer)


# -- Kafka unreachable -------------------------------------------------------------------


async def test_callbacks_get_503_while_kafka_is_cut_off_and_200_once_back(
    sandbox: RunningSandbox, cut_off_broker: CutOffBroker
) -> None:
    timeout = 0.5
    async with running_receiver(sandbox, cut_off_broker.settings, timeout) as receiver:
        first = receiver.order(KSU)
        assert (await receiver.callback(KSU, first)).status_code == 200

        cut_off_broker.proxy.cut()
        waiting = [(KSU, receiver.order(KSU)), (LEM, receiver.order(LEM))]
        for account, order in waiting:
            started = time.monotonic()
            response = await receiver.callback(account, order)
            assert response.status_code == 503
            assert response.headers["retry-after"] == str(RETRY_AFTER)
            assert time.monotonic() - started < timeout + 1.5

        await cut_off_broker.proxy.start()
        deadline = time.monotonic() + 20
        for account, order in waiting:  # the providers retry
            while (response := await receiver.callback(account, order)).status_code != 200:
                assert response.status_code == 503
                assert time.monotonic() < deadline, "callbacks still refused after Kafka is back"
            assert response.text == ("ok" if account == KSU else "success")

        # At least once: a write that timed out may have been delivered as well.
        wanted = {order_key(first), *(order_key(order) for _, order in waiting)}
        async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
            await inbox.wait_for(lambda rs: wanted <= set(keys(rs)), what="every acked callback")


# -- watch requests ----------------------------------------------------------------------


async def test_watch_requests(receiver: RunningReceiver) -> None:
    response = await receiver.http.post(
        "/orders/watch", json={"provider": "lemft", "account": LEM, "order_id": "L-77"}
    )
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "key": f"lemft/{LEM}/L-77"}

    def watch(**fields: Any) -> bytes:
        return orjson.dumps({"provider": "lemft", "account": LEM, "order_id": "L-1", **fields})

    for body, status in [
        (b"not json", 400),
        (b"[]", 400),
        (orjson.dumps({"provider": "lemft", "account": LEM}), 400),
        (watch(order_id=" "), 400),
        (watch(order_id=5), 400),
        (watch(order_id="x" * 129), 400),
        (watch(order_id="L-1,L-2"), 400),
        (watch(order_id="L 1"), 400),
        (watch(account="nope"), 404),
        (watch(provider="nope"), 404),
        (b" " * (LIMIT + 1), 413),
    ]:
        response = await receiver.http.post(
            "/orders/watch", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, body
        assert response.json()["error"]

    async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
        await inbox.wait_for_count(1)
        [record] = await inbox.quiet(0.2)
    assert record.key == f"lemft/{LEM}/L-77"
    assert record.value["trigger"] == "watch"
    assert record.value["body"] == ""
    assert ISO_UTC.fullmatch(record.value["received_at"])


# -- health, readiness, metrics ----------------------------------------------------------


async def test_health_readiness_and_metrics(receiver: RunningReceiver) -> None:
    health = await receiver.http.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok")

    ready = await receiver.http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "degraded": []})
    receiver.problems.append("worker not running")
    ready = await receiver.http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "problems": ["worker not running"], "degraded": []}

    order = receiver.order(LUN)
    assert (await receiver.callback(LUN, order)).status_code == 200
    assert (await receiver.callback(KSU, receiver.order(KSU), bad_sign=True)).status_code == 401
    assert (await receiver.http.post("/callbacks/lunpay/nope")).status_code == 404
    watch = {"provider": "lunpay", "account": LUN, "order_id": order.order_id}
    assert (await receiver.http.post("/orders/watch", json=watch)).status_code == 202

    metrics = await receiver.http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = metrics.text.splitlines()
    callbacks = "order_bridge_callbacks_total"
    for line in [
        series(callbacks, 1, provider="lunpay", account=LUN, outcome="accepted"),
        series(callbacks, 1, provider="kasushou", account=KSU, outcome="rejected_401"),
        series(callbacks, 1, provider="lunpay", account="unknown", outcome="unknown_account"),
        series("order_bridge_watch_requests_total", 1, outcome="accepted"),
        series("order_bridge_inbox_writes_total", 2, outcome="ok"),
        series("order_bridge_deadletters_total", 1, reason="bad_signature"),
    ]:
        assert line in lines, metrics.text


def series(name: str, value: int, **labels: str) -> str:
    """One line of the Prometheus text format, as prometheus-client writes it."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {float(value)}"


# -- version skew ------------------------------------------------------------------------


def future_record(provider: str, account: str, order_id: str, trigger: str) -> dict[str, Any]:
    """An inbox record as a newer receiver might write it: fields this one does not know,
    optional ones left out or null."""
    return {
        "version": 99,
        "provider": provider,
        "account": account,
        "order_id": order_id,
        "trigger": trigger,
        "received_at": "2030-01-01T00:00:00.000Z",
        "body": None,
        "claimed_status": None,
        "priority": {"lane": "express", "weight": 3},
        "tenant": "acme",
        "headers": {"content-type": "application/json", "x-trace": "abc"},
    }


def test_an_inbox_record_of_a_future_version_is_read() -> None:
    value = orjson.dumps(future_record("lemft", LEM, "L-9", "callback"))
    record = InboxRecord.decode(value)
    assert (record.provider, record.account, record.order_id) == ("lemft", LEM, "L-9")
    assert (record.trigger, record.body, record.claimed_status) == ("callback", "", None)
    assert record.headers == {"content-type": "application/json", "x-trace": "abc"}
    # Written back (by a replay, say) in this version's shape.
    assert InboxRecord.decode(record.encode()) == record
    assert orjson.loads(record.encode())["version"] == InboxRecord.VERSION


async def test_a_newer_receivers_hint_is_confirmed_by_this_worker(bridge: RunningBridge) -> None:
    kafka = bridge.bridge.config.kafka
    order_id, key = bridge.create("lunpay", "succeeded")
    record = future_record("lunpay", bridge.sandbox.accounts["lunpay"].name, order_id, "watch")
    producer = Producer(kafka)
    await producer.start()
    try:
        await producer.send(kafka.inbox_topic, key, orjson.dumps(record), timeout=10)
    finally:
        await producer.stop()

    [event] = await bridge.events_for(key, 1)
    assert event.value["status"] == "succeeded"
    assert event.value["trigger"] == "watch"
    assert not [r for r in bridge.deadletter.records if r.key == key]


def test_headers_are_read_as_starlette_reads_them() -> None:
    raw = [(b"content-type", b"application/json"), (b"x-request-id", b"r1")]
    raw += [(b"x-request-id", b"r2"), (b"user-agent", b"caf\xe9")]
    scope = {"type": "http", "headers": raw, "client": ("10.0.0.9", 5)}
    request = Request(scope)
    headers = _headers(raw)
    assert headers == {name: request.headers[name] for name in request.headers}
    assert headers["x-request-id"] == "r1"
    assert _kept_headers(scope, headers) == {
        "content-type": "application/json",
        "user-agent": "café",
        "x-request-id": "r1",
        "remote_addr": "10.0.0.9",
    }
