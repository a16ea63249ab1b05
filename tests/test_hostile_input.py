"""Hostile input at the receiver: text that is not Unicode, order ids that would spoil a
log line or a query, and clients that send slowly or leave half-way.

Over real HTTP (raw sockets where a client must misbehave), with a real broker: what is
asserted is the answer, the dead-letter record and the log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from bridge import providers
from bridge.config import KafkaSettings
from bridge.errors import MalformedCallback
from bridge.providers.base import _json_problem, _plainly_fit
from tests.conftest import RunningSandbox
from tests.helpers import make_accounts
from tests.kafka import read_topic
from tests.test_receiver import KSU, LEM, LUN, RunningReceiver, running_receiver, text_of

HEADER_TIMEOUT = 0.6
BODY_TIMEOUT = 1.2
IDLE_TIMEOUT = 0.6
# Longer than every timeout above, and than the slowest machine needs to notice one.
PATIENCE = 5.0
PASSWORD = "4821-0937"
JSON = {"content-type": "application/json"}
# What must never reach a log line raw: line breaks, ANSI escapes, NULs, bidi and
# zero-width marks, line and paragraph separators.
INVISIBLE = ("\r", "\n", "\x1b", "\x00", "\u202e", "\u200b", "\u2028", "\u2029")


@pytest.fixture
async def receiver(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> AsyncIterator[RunningReceiver]:
    async with running_receiver(
        sandbox,
        kafka_settings,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
    ) as running:
        yield running


def with_field(body: bytes, raw_member: bytes) -> bytes:
    """A JSON object's text with `raw_member` (`"name": value`, as bytes) put first."""
    assert body.startswith(b"{")
    return b"{" + raw_member + b"," + body[1:]


def signed_with(body: bytes, sign: object) -> bytes:
    """A JSON callback's text with its `sign` replaced."""
    return json.dumps({**json.loads(body), "sign": sign}, ensure_ascii=False).encode()


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text
    assert "Exception in ASGI application" not in caplog.text


# -- text that is not Unicode ------------------------------------------------------------


async def test_lone_surrogates_and_non_ascii_signs_are_refused_not_500(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    lemft = receiver.order(LEM, cvv="321", card_password=PASSWORD)
    lunpay = receiver.order(LUN)
    kasushou = receiver.order(KSU)
    sandbox = receiver.sandbox.sandbox
    lem_body, _ = sandbox.callback(LEM, lemft.order_id)
    lun_body, _ = sandbox.callback(LUN, lunpay.order_id)
    ksu_body, _ = sandbox.callback(KSU, kasushou.order_id)
    escaped, raw = rb'"remark": "x\ud800y"', b'"remark": "x\xed\xa0\x80y"'
    cases = [
        # (provider/account, body, content type, status, dead-letter reason)
        (f"lemft/{LEM}", with_field(lem_body, escaped), JSON, 400, "malformed"),
        (f"lemft/{LEM}", with_field(lem_body, raw), JSON, 400, "malformed"),
        (f"lunpay/{LUN}", with_field(lun_body, escaped), JSON, 400, "malformed"),
        (f"lunpay/{LUN}", with_field(lun_body, raw), JSON, 400, "malformed"),
        # A surrogate in a field kasushou signs: the signer must never see it.
        (f"kasushou/{KSU}", with_field(ksu_body, escaped), JSON, 400, "malformed"),
        # A sign that is not ASCII can't match a hex digest.
        (f"kasushou/{KSU}", signed_with(ksu_body, "é"), JSON, 401, "bad_signature"),
        (
            f"kasushou/{KSU}",
            f"ordersn={kasushou.order_id}&sign=%C3%A9".encode(),
            {"content-type": "application/x-www-form-urlencoded"},
            401,
            "bad_signature",
        ),
        (f"kasushou/{KSU}", signed_with(ksu_body, 5), JSON, 401, "bad_signature"),
    ]
    for path, body, headers, status, reason in cases:
        response = await receiver.http.post(f"/callbacks/{path}", content=body, headers=headers)
        assert response.status_code == status, (body, response.text)
        assert reason in response.text

    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        await deadletters.wait_for_count(len(cases))
        records = await deadletters.quiet(0.2)
    assert len(records) == len(cases)
    assert sorted(r.value["reason"] for r in records) == sorted(c[-1] for c in cases)
    for record in records:
        assert "body" in record.value
        assert PASSWORD not in text_of(record)
    no_traceback(caplog)


async def test_integers_past_64_bits_are_kept_exactly(receiver: RunningReceiver) -> None:
    # Valid JSON that orjson can't write: the masked copy must still be stored.
    order = receiver.order(LEM, cvv="321")
    body, _ = receiver.sandbox.sandbox.callback(LEM, order.order_id)
    big = b"123456789012345678901234567890"
    response = await receiver.http.post(
        f"/callbacks/lemft/{LEM}", content=with_field(body, b'"trace": ' + big), headers=JSON
    )
    assert response.status_code == 200, response.text

    async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
        [record] = await inbox.wait_for_count(1)
    stored = record.value["body"]
    assert big.decode() in stored
    assert '"cvv":"******"' in stored


# -- order ids ---------------------------------------------------------------------------


BAD_IDS = [
    "x" * 129,
    "L-1,L-2",
    "L 1",
    "L-1\r\nERROR forged line",
    "L-\x1b[31m1",
    "L-\x001",
    "L-\u202e1",
    "L-\u200b1",
    "L-\u20281",
    "L-\u00a01",
]


async def test_callback_order_ids_follow_the_watch_rules(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    refused = 0
    for account in (LEM, LUN, KSU):  # kasushou's are signed: the rule holds all the same
        for order_id in BAD_IDS:
            order = receiver.order(account, order_id=order_id)
            response = await receiver.callback(account, order)
            assert response.status_code == 400, (account, order_id, response.text)
            assert "order_id" in response.text
            refused += 1
            watch = {"provider": order.provider, "account": account, "order_id": order_id}
            response = await receiver.http.post("/orders/watch", json=watch)
            assert response.status_code == 400, (account, order_id, response.text)
        # The longest and the most exotic ids that are fine.
        for order_id in ("y" * 128, "订单-1/ß"):
            order = receiver.order(account, order_id=order_id)
            assert (await receiver.callback(account, order)).status_code == 200

    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        await deadletters.wait_for_count(refused)
        records = await deadletters.quiet(0.2)
    assert len(records) == refused
    assert {r.value["reason"] for r in records} == {"malformed"}
    # Ids that are kept go through the inbox to the worker's logs: none of the bad ones.
    async with read_topic(receiver.kafka, receiver.kafka.inbox_topic) as inbox:
        kept = await inbox.wait_for_count(6)
    assert {r.value["order_id"] for r in kept} == {"y" * 128, "订单-1/ß"}

    for line in caplog.messages:
        assert not any(c in line for c in INVISIBLE), repr(line)
        assert len(line) < 400, line


async def test_what_a_client_sends_is_escaped_in_log_lines(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = "/callbacks/lemft/x%0D%0AERROR%20forged%1B%5B31m%E2%80%AE" + "z" * 300
    assert (await receiver.http.post(path, content=b"{}", headers=JSON)).status_code == 404
    [line] = [m for m in caplog.messages if "unknown provider or account" in m]
    assert "x\\r\\nERROR forged\\x1b[31m\\u202ezzz" in line
    assert line.endswith("...")
    assert len(line) < 250


# -- slow and vanishing clients ----------------------------------------------------------


class RawClient:
    """One TCP connection that sends what it is told, for clients that misbehave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, also: Callable[[], bool] = lambda: False) -> tuple[bytes, float]:
        """Reads until the server closes the connection (or `also()` holds); what it said
        and how many seconds that took. Fails the test after PATIENCE seconds."""
        started = time.monotonic()
        answer = b""
        try:
            async with asyncio.timeout(PATIENCE):
                while chunk := await self.reader.read(65536):
                    answer += chunk
                    if also():
                        break
        except TimeoutError:
            raise AssertionError(f"connection still open after {PATIENCE}s: {answer!r}") from None
        finally:
            self.writer.close()
        return answer, time.monotonic() - started


def request_head(url: str, path: str, length: int) -> bytes:
    host = url.removeprefix("http://")
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


async def test_idle_connections_are_closed(receiver: RunningReceiver) -> None:
    # One that never says a word.
    silent = await RawClient.connect(receiver.url)
    answer, took = await silent.until_closed()
    assert answer == b""
    assert took >= IDLE_TIMEOUT * 0.8

    # One kept alive after its request.
    kept = await RawClient.connect(receiver.url)
    await kept.send(f"GET /healthz HTTP/1.1\r\nhost: {receiver.url[7:]}\r\n\r\n".encode())
    answer, took = await kept.until_closed()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert took < PATIENCE


async def test_request_headers_must_come_in_time(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    head = request_head(receiver.url, f"/callbacks/lemft/{LEM}", 2)
    half = await RawClient.connect(receiver.url)
    await half.send(head[:40])
    answer, took = await half.until_closed()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert took >= HEADER_TIMEOUT * 0.8

    # Trickled a byte at a time, each one in time: the deadline is for all of them.
    trickle = await RawClient.connect(receiver.url)
    started = time.monotonic()
    answer = b""
    for byte in head[:-1]:
        await trickle.send(bytes([byte]))
        # The attacker's pace; stopping at the answer, as more bytes would reset the line.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HEADER_TIMEOUT / 10):
                answer = await trickle.reader.read(65536)
                break
    rest, _ = await trickle.until_closed()
    assert (answer + rest).startswith(b"HTTP/1.1 408 "), answer + rest
    assert time.monotonic() - started < HEADER_TIMEOUT + PATIENCE / 2
    no_traceback(caplog)


async def test_a_body_that_never_ends_is_cut_off_with_408(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    for path in (f"/callbacks/lunpay/{LUN}", "/orders/watch"):
        slow = await RawClient.connect(receiver.url)
        await slow.send(request_head(receiver.url, path, 100) + b'{"order_no": ')
        answer, took = await slow.until_closed()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower()
        assert b"request body not received in time" in answer
        assert took >= BODY_TIMEOUT * 0.8
    lines = [m for m in caplog.messages if "body not received in time" in m]
    assert len(lines) == 2, caplog.text
    no_traceback(caplog)
    # Nothing is kept of a body that did not come: the provider sends it again.
    async with read_topic(receiver.kafka, receiver.kafka.deadletter_topic) as deadletters:
        assert await deadletters.quiet(0.2) == []


async def test_a_client_leaving_mid_body_costs_one_log_line(
    receiver: RunningReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    leaving = await RawClient.connect(receiver.url)
    await leaving.send(request_head(receiver.url, f"/callbacks/lemft/{LEM}", 100) + b"{")
    leaving.writer.close()
    await leaving.writer.wait_closed()

    deadline = time.monotonic() + PATIENCE
    while not any("left before its body ended" in m for m in caplog.messages):
        assert time.monotonic() < deadline, caplog.text
        await asyncio.sleep(0.02)
    # And the receiver is fine: the next callback is taken.
    order = receiver.order(LEM)
    assert (await receiver.callback(LEM, order)).status_code == 200
    ours = [r for r in caplog.records if r.name.startswith(("bridge", "uvicorn"))]
    assert len([r for r in ours if r.levelno >= logging.WARNING]) == 1, caplog.text
    no_traceback(caplog)


@pytest.mark.parametrize("provider", ["lemft", "lunpay", "kasushou"])
@pytest.mark.parametrize(
    "body",
    [
        rb'{"order_id": "1", "order_no": "1", "ordersn": "1", "\ud800": "key"}',
        rb'{"order_id": "1", "order_no": "1", "ordersn": "1", "x": [{"y": ["\udc00"]}]}',
        b'{"order_id": "1", "order_no": "1", "ordersn": "1\xed\xb0\x80"}',
        b'{"order_id": "1", "order_no": "1", "ordersn": "1", "sign": "\xed\xa0\x80"}',
    ],
)
def test_every_provider_refuses_text_that_is_not_unicode(provider: str, body: bytes) -> None:
    account = make_accounts()[provider]
    with pytest.raises(MalformedCallback):
        providers.get(provider).parse_callback(account, body, JSON)


def test_json_is_taken_as_fit_without_a_walk_only_when_it_must_be() -> None:
    texts = ['{"a": "\\ud800"}', '{"a": "\\ud83d\\ude00"}', '{"a": "x", "b": [1, {"c": 2}]}']
    for depth in range(28, 36):
        for opening, closing in (("[", "]"), ('{"k": ', "}")):
            texts.append('{"a": ' + opening * depth + "1" + closing * depth + "}")
    for text in texts:
        walked = _json_problem(json.loads(text))
        if _plainly_fit(text):
            assert walked is None, text
    assert not _plainly_fit(texts[0])
    assert _json_problem(json.loads(texts[0])) is not None
