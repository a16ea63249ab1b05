"""The documents consumers' tools read are true to the code: the status event's JSON
Schema, the AsyncAPI document of the topics, the OpenAPI document of the receiver.

Every status event the suite reads is also checked against the schema as it is read
(`tests.kafka.check_status_event`).
"""

from __future__ import annotations

import dataclasses
import typing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from jsonschema import Draft7Validator, Draft202012Validator, ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.applications import Starlette
from starlette.routing import Route

from bridge import openapi, tracing
from bridge.config import Config, KafkaSettings
from bridge.deadletter import Reason, dead_letter
from bridge.events import DATASCHEMA, TRIGGERS, StatusEvent
from bridge.inbox import InboxRecord
from bridge.kafka import Producer, ensure_topics
from bridge.metrics import Metrics
from bridge.orders import OrderSnapshot, ProviderStatus, Status
from bridge.receiver import Readiness, create_app
from bridge.servers import serve
from bridge.state import OrderState
from tests.helpers import make_accounts
from tests.kafka import STATUS_SCHEMA, STATUS_SCHEMA_PATH, check_status_event, read_topic

DOCS = Path(__file__).parent.parent / "docs"
ASYNCAPI: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())


def status_event(**changes: Any) -> StatusEvent:
    snapshot = OrderSnapshot(
        provider="kasushou",
        account="ksu-main",
        order_id="D100759274105949519872",
        external_order_id="",
        status=Status.REFUNDED,
        provider_status=ProviderStatus(5, "refunded"),
        amount=Decimal("99.50"),
        currency="CNY",
        details={"card_list": [{"card_no": "************1234", "card_password": "******"}]},
    )
    return StatusEvent(
        snapshot=dataclasses.replace(snapshot, **changes),
        previous_status=Status.SUCCEEDED,
        previous_event_id="e1",
        trigger="callback",
        observed_at=datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC),
    )


# -- the status event's JSON Schema -----------------------------------------------------


def test_the_status_schema_is_the_events_shape() -> None:
    Draft202012Validator.check_schema(STATUS_SCHEMA)
    assert STATUS_SCHEMA["$id"] == DATASCHEMA
    properties = STATUS_SCHEMA["properties"]
    assert properties["trigger"]["enum"] == list(TRIGGERS)
    assert STATUS_SCHEMA["$defs"]["status"]["enum"] == [s.value for s in Status]
    event = status_event()
    value = orjson.loads(event.value())
    assert STATUS_SCHEMA["required"] == list(properties) == list(value)
    check_status_event({k: v.decode() for k, v in event.headers()}, value, "an event")
    for example in STATUS_SCHEMA["examples"]:
        check_status_event({"ce_dataschema": DATASCHEMA}, example, "the schema's example")


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 99.5},  # a float
        {"amount": "9.95E+1"},
        {"status": "done"},
        {"previous_status": "done"},
        {"trigger": "cron"},
        {"observed_at": "2026-11-22T10:00:00Z"},  # no milliseconds
        {"observed_at": "2026-11-22T10:00:00.123+08:00"},
        {"provider_status": {"code": 5.5, "label": "refunded"}},
        {"provider_status": {"code": 5}},
        {"details": []},
        {"order_id": "a,b"},
        {"surprise": 1},
    ],
)
def test_the_status_schema_refuses_what_the_contract_rules_out(change: dict[str, Any]) -> None:
    value = {**orjson.loads(status_event().value()), **change}
    with pytest.raises(AssertionError, match="does not match"):
        check_status_event({"ce_dataschema": DATASCHEMA}, value, "changed")


@pytest.mark.parametrize("amount", [None, Decimal("0"), Decimal("-3.10"), Decimal(12)])
def test_amounts_the_bridge_writes_match(amount: Decimal | None) -> None:
    value = orjson.loads(status_event(amount=amount).value())
    check_status_event({"ce_dataschema": DATASCHEMA}, value, "an event")


async def test_a_status_record_that_breaks_the_schema_fails_its_reader(
    kafka_settings: KafkaSettings,
) -> None:
    await ensure_topics(kafka_settings)
    topic = kafka_settings.status_topic
    headers = [(k, v) for k, v in status_event().headers() if k != "ce_dataschema"]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, status_event().value(), b"k", headers=headers)
    finally:
        await producer.stop()
    async with read_topic(kafka_settings, topic) as reader:
        with pytest.raises(AssertionError, match="ce_dataschema None"):
            await reader.wait_for_count(1)


# -- the AsyncAPI document ---------------------------------------------------------------


def resolve(ref: str) -> Any:
    """A local `#/...` reference of the AsyncAPI document, or a file beside it."""
    if not ref.startswith("#/"):
        return orjson.loads((DOCS / ref).read_bytes())
    node: Any = ASYNCAPI
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_the_asyncapi_document_names_the_topics_keys_and_headers() -> None:
    assert ASYNCAPI["asyncapi"] == "3.0.0"
    defaults = KafkaSettings()
    addresses = {name: channel["address"] for name, channel in ASYNCAPI["channels"].items()}
    assert addresses == {
        "status": defaults.status_topic,
        "inbox": defaults.inbox_topic,
        "deadletter": defaults.deadletter_topic,
        "state": defaults.state_topic,
    }
    for ref in refs(ASYNCAPI):
        assert resolve(ref) is not None, ref

    (message,) = ASYNCAPI["channels"]["status"]["messages"].values()
    status = resolve(message["$ref"])
    assert resolve(status["payload"]["$ref"]) == STATUS_SCHEMA
    assert (DOCS / status["payload"]["$ref"]).samefile(STATUS_SCHEMA_PATH)
    names = [name for name, _ in status_event().headers()]
    assert status["headers"]["required"] == names
    # The one header not always there: the trace context (bridge/tracing.py).
    assert list(status["headers"]["properties"]) == [*names, tracing.HEADER]
    schemas = ASYNCAPI["components"]["schemas"]
    assert schemas["deadLetterReason"]["enum"] == list(typing.get_args(Reason))


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    """Against the official AsyncAPI 3.0.0 JSON Schema: npm's @asyncapi/specs 6.11.1,
    schemas/3.0.0-without-$id.json (Apache-2.0), kept in tests/fixtures."""
    official = orjson.loads(
        (Path(__file__).parent / "fixtures/asyncapi-3.0.0.schema.json").read_bytes()
    )
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in Draft7Validator(official).iter_errors(ASYNCAPI)
    ]
    assert errors == []


def asyncapi_validator(message: str) -> Draft202012Validator:
    """Validates against a message's payload, `#/...` references resolved in the document."""
    uri = "urn:order-bridge:asyncapi"
    registry: Registry[Any] = Registry().with_resource(uri, DRAFT202012.create_resource(ASYNCAPI))
    ref = {"$ref": f"{uri}#/components/messages/{message}/payload"}
    return Draft202012Validator(ref, registry=registry)


def test_the_asyncapi_payloads_accept_the_records_the_bridge_writes() -> None:
    record = InboxRecord("kasushou", "ksu", "D1", "callback", "2026-11-22T10:00:00.000Z", body="x")
    asyncapi_validator("hint").validate(record.to_json())
    value, _ = dead_letter(
        "unconfirmed", "HTTP 503", provider="kasushou", account="ksu", record=record
    )
    asyncapi_validator("deadLetter").validate(orjson.loads(value))
    state = OrderState(first_seen=1.0, status=Status.SUCCEEDED, code=3, event_id="e")
    asyncapi_validator("orderState").validate(orjson.loads(state.encode(covered=4)))
    with pytest.raises(ValidationError, match="is not one of"):
        asyncapi_validator("hint").validate({**record.to_json(), "trigger": "cron"})


# -- the OpenAPI document -----------------------------------------------------------------


def receiver_app() -> Starlette:
    async def ready() -> Readiness:
        return Readiness([], [])

    config = Config(accounts=tuple(make_accounts().values()))
    # A producer never started: building the app connects to nothing.
    return create_app(config, Producer(config.kafka), Metrics(), ready)


def test_the_openapi_document_names_every_route_and_nothing_else() -> None:
    routes = {
        (route.path, method.lower())
        for route in receiver_app().routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {
        (path, method) for path, item in openapi.document()["paths"].items() for method in item
    }
    assert documented == routes
    assert openapi.document()["openapi"] == "3.1.0"


async def test_the_receiver_serves_the_openapi_document_kept_in_docs() -> None:
    async with serve(receiver_app()) as url, httpx.AsyncClient() as http:
        answer = await http.get(f"{url}/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    kept = orjson.loads((DOCS / "openapi.json").read_bytes())
    assert answer.json() == kept == openapi.document(), (
        "docs/openapi.json is out of date: python -m bridge.openapi > docs/openapi.json"
    )
