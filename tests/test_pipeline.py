"""Callbacks in, confirmed status events out: receiver, worker, sandbox and a real broker."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from bridge.accounts import Secret
from bridge.config import KafkaSettings
from bridge.errors import StartupError
from bridge.providers.lunpay import Lunpay
from bridge.replay import replay
from bridge.sandbox import Faults
from bridge.sealing import unseal
from bridge.service import run
from bridge.worker import Worker
from tests.bridge_fixtures import (
    CODES,
    RunningBridge,
    bridge_config,
    config_toml,
    running_bridge,
)
from tests.conftest import CutOffBroker, RunningSandbox
from tests.helpers import SECRETS

PROVIDERS = ["lemft", "lunpay", "kasushou"]
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_callback_gives_one_event_in_the_contracts_shape(
    bridge: RunningBridge, provider: str
) -> None:
    order_id, key = bridge.create(provider)
    response = await bridge.post_callback(provider, order_id)
    assert response.status_code == 200
    assert response.text == ("ok" if provider == "kasushou" else "success")

    (event,) = await bridge.events_for(key, 1)
    account = bridge.sandbox.accounts[provider].name
    assert event.headers["ce_specversion"] == "1.0"
    assert event.headers["ce_source"] == f"order-bridge/{provider}/{account}"
    assert event.headers["ce_type"] == "order.status.changed"
    assert event.headers["ce_subject"] == order_id
    assert ISO_UTC.fullmatch(event.headers["ce_time"])
    assert event.headers["ce_dataschema"] == "urn:order-bridge:schema:order-status-event:v1"
    assert event.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f-]{36}", event.headers["ce_id"])
    value = event.value
    assert list(value) == [
        "provider",
        "account",
        "order_id",
        "external_order_id",
        "status",
        "previous_status",
        "provider_status",
        "amount",
        "currency",
        "observed_at",
        "trigger",
        "details",
    ]
    assert value["provider"] == provider
    assert value["account"] == account
    assert value["order_id"] == order_id
    assert value["status"] == "processing"
    assert value["previous_status"] is None
    assert value["provider_status"]["code"] == CODES[provider]["processing"]
    assert value["amount"] == "375.28"
    assert value["currency"] == ("CNY" if provider == "kasushou" else "USD")
    assert ISO_UTC.fullmatch(value["observed_at"])
    assert value["trigger"] == "callback"
    assert isinstance(value["details"], dict)


async def test_the_same_callback_five_times_gives_one_event(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("kasushou", "succeeded")
    for _ in range(5):
        assert (await bridge.post_callback("kasushou", order_id)).status_code == 200
    await bridge.events_for(key, 1)
    # The five hints are handled one after another: wait until the last is done.
    await bridge.status.quiet(1.0)
    assert [r.value["status"] for r in bridge.status.records if r.key == key] == ["succeeded"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_status_changes_give_chained_events_in_order(
    bridge: RunningBridge, provider: str
) -> None:
    order_id, key = bridge.create(provider, "processing")
    for status in ("processing", "succeeded", "refunded"):
        bridge.move(provider, order_id, status)
        await bridge.post_callback(provider, order_id)
        await bridge.events_for(key, {"processing": 1, "succeeded": 2, "refunded": 3}[status])
    events = await bridge.events_for(key, 3)
    chain = [(e.value["previous_status"], e.value["status"]) for e in events]
    assert chain == [(None, "processing"), ("processing", "succeeded"), ("succeeded", "refunded")]
    assert len({e.headers["ce_id"] for e in events}) == 3
    assert len({e.partition for e in events}) == 1


@pytest.mark.parametrize("provider", ["lemft", "lunpay"])
async def test_a_forged_success_is_published_as_what_the_provider_says(
    bridge: RunningBridge, provider: str
) -> None:
    order_id, key = bridge.create(provider, "processing")
    forged = await bridge.post_callback(provider, order_id, status=CODES[provider]["succeeded"])
    assert forged.status_code == 200
    (event,) = await bridge.events_for(key, 1)
    assert event.value["status"] == "processing"


async def test_an_unknown_provider_code_gives_an_unknown_event(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("lunpay", "processing")
    bridge.move("lunpay", order_id, 42)
    await bridge.post_callback("lunpay", order_id)
    (event,) = await bridge.events_for(key, 1)
    assert event.value["status"] == "unknown"
    assert event.value["provider_status"] == {"code": 42, "label": "unknown"}


async def test_a_stale_answer_is_not_published(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("kasushou", "succeeded")
    await bridge.post_callback("kasushou", order_id)
    await bridge.events_for(key, 1)
    bridge.move("kasushou", order_id, "refunded")
    await bridge.post_callback("kasushou", order_id)
    await bridge.events_for(key, 2)
    # A lagging replica answers the previous state from now on.
    account = bridge.sandbox.accounts["kasushou"].name
    bridge.sandbox.sandbox.set_faults(account, Faults(stale_rate=1.0))
    await bridge.post_callback("kasushou", order_id)
    metrics = await bridge.wait_for_metric("order_bridge_stale_answers_total", 1)
    assert 'order_bridge_stale_answers_total{provider="kasushou"}' in metrics
    assert [r.value["status"] for r in bridge.status.records if r.key == key] == [
        "succeeded",
        "refunded",
    ]


async def test_a_kasushou_card_order_publishes_masked_cards(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("kasushou", "succeeded")
    await bridge.post_callback("kasushou", order_id)
    (event,) = await bridge.events_for(key, 1)
    order = bridge.sandbox.sandbox.order(bridge.sandbox.accounts["kasushou"].name, order_id)
    cards = order.fields["card_list"]
    assert cards, "the sandbox makes card orders by default"
    raw = str(event.value)
    for card in cards:
        assert card["card_password"] not in raw
        assert card["card_no"] not in raw
    assert event.value["details"]["card_list"][0]["card_password"] == "******"
    for secret in SECRETS:
        assert secret not in raw


async def test_an_account_with_a_card_key_publishes_cards_sealed_for_consumers(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    key = Secret(base64.b64encode(os.urandom(32)).decode())
    changes = {"kasushou": {"card_key": key}}
    async with running_bridge(sandbox, kafka_settings, accounts=changes) as bridge:
        order_id, order_key = bridge.create("kasushou", "succeeded")
        await bridge.post_callback("kasushou", order_id)
        (event,) = await bridge.events_for(order_key, 1)
    cards = sandbox.sandbox.order(sandbox.accounts["kasushou"].name, order_id).fields["card_list"]
    published = event.value["details"]["card_list"]
    raw = str(event.value)
    assert len(published) == len(cards) > 0
    for card, sealed in zip(cards, published, strict=True):
        assert card["card_password"] not in raw
        assert card["card_no"] not in raw
        assert unseal(key, "card_password", sealed["card_password"]) == card["card_password"]
        assert unseal(key, "card_no", sealed["card_no"]) == card["card_no"]


async def test_a_provider_that_stays_down_ends_in_the_dead_letter_topic(
    bridge: RunningBridge,
) -> None:
    order_id, key = bridge.create("lemft")
    bridge.sandbox.sandbox.set_faults(bridge.sandbox.accounts["lemft"].name, Faults(down=True))
    assert (await bridge.post_callback("lemft", order_id)).status_code == 200
    (record,) = await bridge.deadletter.wait_for(
        lambda rs: any(r.key == key for r in rs), timeout=30, what="a dead letter"
    )
    assert record.value["reason"] == "unconfirmed"
    assert record.value["attempts"] > 1
    assert "HTTP 503" in record.value["detail"]
    assert record.value["record"]["order_id"] == order_id
    assert not [r for r in bridge.status.records if r.key == key]


async def test_watch_request_confirms_an_order_without_callback(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("lunpay", "succeeded")
    assert (await bridge.watch("lunpay", order_id)).status_code == 202
    (event,) = await bridge.events_for(key, 1)
    assert (event.value["status"], event.value["trigger"]) == ("succeeded", "watch")


async def test_restart_keeps_deduplication(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    async with running_bridge(sandbox, kafka_settings) as first:
        order_id, key = first.create("lemft", "succeeded")
        await first.post_callback("lemft", order_id)
        await first.events_for(key, 1)
    async with running_bridge(sandbox, kafka_settings) as second:
        await second.post_callback("lemft", order_id)
        second.move("lemft", order_id, "refunded")
        await second.post_callback("lemft", order_id)
        events = await second.events_for(key, 2)
    assert [(e.value["previous_status"], e.value["status"]) for e in events] == [
        (None, "succeeded"),
        ("succeeded", "refunded"),
    ]


async def test_with_kafka_away_callbacks_get_503_and_retries_are_all_published(
    sandbox: RunningSandbox, cut_off_broker: CutOffBroker
) -> None:
    async with running_bridge(sandbox, cut_off_broker.settings) as bridge:
        orders = [bridge.create(provider, "succeeded") for provider in PROVIDERS]
        cut_off_broker.proxy.cut()
        for (order_id, _), provider in zip(orders, PROVIDERS, strict=True):
            refused = await bridge.post_callback(provider, order_id)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
        await cut_off_broker.proxy.start()
        # The provider retries; this time the hints are stored and confirmed.
        for (order_id, _), provider in zip(orders, PROVIDERS, strict=True):
            await bridge.post_until_accepted(provider, order_id)
        for _, key in orders:
            (event,) = await bridge.events_for(key, 1, timeout=30)
            assert event.value["status"] == "succeeded"


async def test_dead_letters_can_be_replayed(bridge: RunningBridge) -> None:
    order_id, key = bridge.create("lemft", "succeeded")
    account = bridge.sandbox.accounts["lemft"].name
    bridge.sandbox.sandbox.set_faults(account, Faults(down=True))
    await bridge.post_callback("lemft", order_id)
    await bridge.deadletter.wait_for(lambda rs: any(r.key == key for r in rs), timeout=30)
    kafka = bridge.bridge.config.kafka
    assert await replay(kafka, reasons=["rejected"]) == {}
    bridge.sandbox.sandbox.set_faults(account, Faults())  # the provider is back
    assert await replay(kafka, reasons=["unconfirmed"], order_key=key) == {"unconfirmed": 1}
    (event,) = await bridge.events_for(key, 1)
    assert (event.value["trigger"], event.value["status"]) == ("replay", "succeeded")


async def test_an_unexpected_error_while_confirming_dead_letters_the_hint_as_failed(
    bridge: RunningBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_id, key = bridge.create("lunpay", "succeeded")

    def bug(*args: object) -> None:
        raise RuntimeError("an adapter bug")

    with monkeypatch.context() as patched:
        patched.setattr(Lunpay, "parse_query", bug)
        await bridge.post_callback("lunpay", order_id)
        (letter,) = await bridge.deadletter.wait_for(lambda rs: any(r.key == key for r in rs))
    assert letter.value["reason"] == "failed"
    assert letter.value["detail"] == "unexpected RuntimeError; see the worker's log"
    # Once the bug is fixed, the hint is replayed like any other.
    assert await replay(bridge.bridge.config.kafka, reasons=["failed"]) == {"failed": 1}
    (event,) = await bridge.events_for(key, 1)
    assert (event.value["trigger"], event.value["status"]) == ("replay", "succeeded")


async def test_a_worker_that_dies_stops_the_bridge_with_an_error(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: object) -> None:
        raise RuntimeError("a worker bug")

    monkeypatch.setattr(Worker, "_take", bug)
    async with running_bridge(sandbox, kafka_settings, with_worker=False) as receiver:
        running = asyncio.create_task(run(bridge_config(sandbox, kafka_settings), receiver=False))
        order_id, _ = receiver.create("lemft", "succeeded")
        await receiver.post_callback("lemft", order_id)
        with pytest.raises(StartupError, match="worker inbox ended: RuntimeError"):
            await asyncio.wait_for(running, 30)


async def test_tail_prints_one_readable_line_an_event(
    bridge: RunningBridge, tmp_path: Path
) -> None:
    order_id, key = bridge.create("lunpay", "succeeded")
    await bridge.post_callback("lunpay", order_id)
    await bridge.events_for(key, 1)
    text, env = config_toml(bridge.bridge.config)
    (tmp_path / "bridge.toml").write_text(text)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "tail", "--from-beginning",
        "--config", str(tmp_path / "bridge.toml"),
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)
    assert key in line
    assert "new -> succeeded" in line
    assert "375.28 USD" in line
    assert "(code 4 completed, callback)" in line
    assert ISO_UTC.match(line)
