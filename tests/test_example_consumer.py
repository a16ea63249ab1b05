"""examples/consumer.py, run as its users run it, on events a bridge published."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from bridge.accounts import Secret
from bridge.config import KafkaSettings
from tests.bridge_fixtures import running_bridge
from tests.conftest import RunningSandbox
from tests.kafka import Record

EXAMPLE = Path(__file__).parent.parent / "examples" / "consumer.py"


async def send(settings: KafkaSettings, record: Record, **changes: object) -> None:
    """`record` written again to its partition, its value and headers changed as given."""
    value = {**record.value, **{k: v for k, v in changes.items() if k != "ce_id"}}
    headers = {**record.headers, "ce_id": str(changes.get("ce_id", record.headers["ce_id"]))}
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            record.topic,
            orjson.dumps(value),
            record.key.encode(),
            partition=record.partition,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
    finally:
        await producer.stop()


async def test_the_example_consumer_deduplicates_checks_chains_and_opens_cards(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings
) -> None:
    card_key = base64.b64encode(os.urandom(32)).decode()
    changes = {"kasushou": {"card_key": Secret(card_key)}}
    async with running_bridge(sandbox, kafka_settings, accounts=changes) as bridge:
        order_id, key = bridge.create("kasushou", "processing")
        assert (await bridge.post_callback("kasushou", order_id)).status_code == 200
        await bridge.events_for(key, 1)
        bridge.move("kasushou", order_id, "succeeded")
        assert (await bridge.post_callback("kasushou", order_id)).status_code == 200
        first, second = await bridge.events_for(key, 2)
        other_id, other_key = bridge.create("lunpay", "processing")
        assert (await bridge.watch("lunpay", other_id)).status_code == 202
        await bridge.events_for(other_key, 1)
    # The second change published again, as after a crash: the same ce_id. Then an event
    # that does not follow from the one before it, as when one was missed.
    await send(kafka_settings, second)
    await send(
        kafka_settings, second, status="refunded", previous_status="processing", ce_id=uuid.uuid4()
    )

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--bootstrap-servers",
        kafka_settings.bootstrap_servers,
        "--topic",
        kafka_settings.status_topic,
        "--until-end",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ORDER_BRIDGE_CARD_KEY": card_key},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()

    ksu = [line.split() for line in lines if key in line]
    assert [(words[0], *words[2:5]) for words in ksu] == [
        ("new", "null", "->", "processing"),
        ("new", "processing", "->", "succeeded"),
        ("duplicate", "processing", "->", "succeeded"),
        ("gap", "processing", "->", "refunded"),
    ]
    assert ksu[0][-1] == first.headers["ce_id"]
    assert ksu[1][-1] == ksu[2][-1] == second.headers["ce_id"]
    lun = [line.split() for line in lines if other_key in line]
    assert [(words[0], *words[2:6]) for words in lun] == [
        ("new", "null", "->", "processing", "(watch)")
    ]
    assert lines[-1] == "5 events: 3 new, 1 duplicate, 1 gap"

    # Each of the three kasushou events that were new to it had its card opened.
    (card,) = sandbox.sandbox.order(sandbox.accounts["kasushou"].name, order_id).fields["card_list"]
    assert lines.count(f"    card_no ...{card['card_no'][-4:]}") == 3
    assert lines.count("    card_password opened") == 3
    assert card["card_no"] not in out.decode()
    assert card["card_password"] not in out.decode()
