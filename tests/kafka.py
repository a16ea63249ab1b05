"""Kafka for the tests: reading topics the way a consumer would, and a proxy that can cut."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from bridge.config import KafkaSettings
from bridge.kafka import stop_consumer

STATUS_SCHEMA_PATH = Path(__file__).parent.parent / "docs/schemas/order-status-event.v1.json"
STATUS_SCHEMA: dict[str, Any] = orjson.loads(STATUS_SCHEMA_PATH.read_bytes())
_status_validator = Draft202012Validator(STATUS_SCHEMA)


def check_status_event(headers: Mapping[str, str], value: Any, where: str) -> None:
    """Fails the test unless a status event names its JSON Schema and matches it: every
    status record the suite reads goes through here."""
    schema = headers.get("ce_dataschema")
    if schema != STATUS_SCHEMA["$id"]:
        raise AssertionError(f"{where}: ce_dataschema {schema!r}, expected {STATUS_SCHEMA['$id']}")
    error = best_match(_status_validator.iter_errors(value))
    if error is not None:
        raise AssertionError(
            f"{where}: the status event does not match {STATUS_SCHEMA_PATH.name}: "
            f"{error.message} at {error.json_path}\n{value!r}"
        )


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str
    value: Any  # decoded JSON, or None for a tombstone
    headers: dict[str, str]


class TopicReader:
    """Reads a topic from its beginning, without a consumer group, as records arrive."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.records: list[Record] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )

    async def start(self) -> None:
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
        await self._consumer.seek_to_beginning()

    async def stop(self) -> None:
        await stop_consumer(self._consumer)

    async def wait_for(
        self, done: Callable[[list[Record]], bool], timeout: float = 20.0, what: str = ""
    ) -> list[Record]:
        """Reads until `done(records)` holds; fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.topic}: timed out waiting for {what or 'records'}; "
                    f"have {[(r.key, r.value) for r in self.records]}"
                )
            batches = await self._consumer.getmany(timeout_ms=100)
            for tp_records in batches.values():
                for r in tp_records:
                    record = Record(
                        topic=r.topic,
                        partition=r.partition,
                        offset=r.offset,
                        key=r.key.decode() if r.key else "",
                        value=None if r.value is None else orjson.loads(r.value),
                        headers={k: v.decode() for k, v in r.headers},
                    )
                    if "ce_type" in record.headers:
                        where = f"{r.topic}/{r.partition}/{r.offset}"
                        check_status_event(record.headers, record.value, where)
                    self.records.append(record)
        return self.records

    async def wait_for_count(self, count: int, timeout: float = 20.0) -> list[Record]:
        return await self.wait_for(lambda rs: len(rs) >= count, timeout, f"{count} records")

    async def quiet(self, seconds: float) -> list[Record]:
        """Everything that arrives within `seconds`: for asserting that nothing more comes."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(AssertionError):
            await self.wait_for(lambda _: time.monotonic() > deadline, seconds + 5)
        return self.records


@contextlib.asynccontextmanager
async def read_topic(settings: KafkaSettings, topic: str) -> AsyncIterator[TopicReader]:
    reader = TopicReader(settings, topic)
    try:
        await reader.start()
        yield reader
    finally:
        await reader.stop()


class TcpProxy:
    """Forwards a loopback port to another; `cut()` drops every connection and refuses new."""

    def __init__(self, target_port: int, port: int) -> None:
        self.target_port = target_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def cut(self) -> None:
        """At once, without awaiting: a logging handler can cut at an exact moment."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
