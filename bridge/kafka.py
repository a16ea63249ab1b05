"""Kafka plumbing shared by the receiver and the worker: client options, topics, the producer."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, RecordMetadata

from bridge.config import KafkaSettings
from bridge.deadlines import Deadlines
from bridge.errors import ConfigError, StartupError

log = logging.getLogger(__name__)

CLIENT_ID = "order-bridge"


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options common to every aiokafka client of the bridge."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": CLIENT_ID,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.reveal()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.ssl_cafile)
    return options


async def ensure_topics(settings: KafkaSettings) -> None:
    """Creates the bridge's topics when missing, and checks that they line up.

    Inbox, status and state must have the same partition count: the worker that owns
    inbox partition p finds its orders' memory in state partition p. Topics created get
    `min.insync.replicas`; a topic with fewer replicas or a lower min.insync.replicas
    than the settings gets a warning, as acks=all on it survives fewer broker losses.
    """
    min_insync = _min_insync_replicas(settings)
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        durable = {"min.insync.replicas": str(min_insync)}
        wanted = {
            settings.inbox_topic: durable,
            settings.status_topic: durable,
            settings.deadletter_topic: durable,
            settings.state_topic: {**durable, "cleanup.policy": "compact"},
        }
        missing = [
            NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=configs)
            for name, configs in wanted.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *rest in response.topic_errors:
                # 36: created meanwhile by another bridge process.
                if code not in (0, 36):
                    message = rest[0] if rest and rest[0] else f"error {code}"
                    raise StartupError(f"cannot create topic {name}: {message}")
            log.info("created topics %s", ", ".join(t.name for t in missing))
        partitions = await _partitions(admin, list(wanted))
        topics_min_insync = await _topics_min_insync(admin, list(wanted))
    except (KafkaError, OSError) as exc:
        raise StartupError(
            f"Kafka at {settings.bootstrap_servers} is not reachable: {type(exc).__name__}"
        ) from None
    finally:
        await admin.close()
    keyed = [settings.inbox_topic, settings.status_topic, settings.state_topic]
    if len({len(partitions[name]) for name in keyed}) != 1:
        found = ", ".join(f"{name} has {len(partitions[name])}" for name in keyed)
        raise StartupError(f"inbox, status and state topics need the same partition count: {found}")
    for name in wanted:
        replicas = min(len(p["replicas"]) for p in partitions[name])
        _check_durability(settings, min_insync, name, replicas, topics_min_insync.get(name))


def _min_insync_replicas(settings: KafkaSettings) -> int:
    """The topics' min.insync.replicas the settings ask for (2 when replication_factor
    >= 3, else 1, unless set); above replication_factor it is a config error."""
    factor = settings.replication_factor
    wanted = settings.min_insync_replicas
    if wanted is None:
        wanted = 2 if factor >= 3 else 1
    if wanted > factor:
        raise ConfigError(
            "kafka.min_insync_replicas",
            f"is {wanted}, above replication_factor {factor}: every acks=all write would fail",
        )
    if wanted < 2 <= factor:
        log.warning(
            "kafka.min_insync_replicas is 1 with replication_factor %d: an acks=all write is "
            "acked by one broker and lost with it (replication_factor 3 with "
            "min_insync_replicas 2 survives the loss of one)",
            factor,
        )
    return wanted


async def _partitions(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, list[Any]]:
    """Each topic's partitions as describe_topics reports them (replicas included)."""
    found = {}
    for description in await admin.describe_topics(topics):
        name = description["topic"]
        if description.get("error_code"):
            raise StartupError(
                f"topic {name} cannot be described (error {description['error_code']})"
            )
        found[name] = description["partitions"]
    return found


async def _topics_min_insync(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's min.insync.replicas as the broker reports it; a topic it does not
    report is left out, and said at INFO. All configs are asked for: Tansu drops the
    connection when asked for named ones."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:
        log.info(
            "min.insync.replicas of the topics not checked: the broker did not describe "
            "their configs (%s)",
            type(exc).__name__,
        )
        return {}
    found = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            entries = {e["config_names"]: e["config_value"] for e in resource["config_entries"]}
            value = entries.get("min.insync.replicas")
            if not resource["error_code"] and value is not None and value.isdigit():
                found[resource["resource_name"]] = int(value)
    if unchecked := [name for name in topics if name not in found]:
        log.info(
            "min.insync.replicas of topics %s not checked: the broker does not report it",
            ", ".join(unchecked),
        )
    return found


def _check_durability(
    settings: KafkaSettings, min_insync: int, topic: str, replicas: int, topic_min: int | None
) -> None:
    """Stops a start on a topic no acks=all write can reach; warns about one on which
    acks=all promises less than the settings."""
    if topic_min is not None and topic_min > replicas:
        raise StartupError(
            f"topic {topic} has min.insync.replicas {topic_min} but {replicas} replica(s): "
            "every acks=all write to it would fail"
        )
    factor = settings.replication_factor
    if replicas >= factor and (topic_min is None or topic_min >= min_insync):
        return
    reported = "not reported" if topic_min is None else topic_min
    has = f"replication factor {replicas}, min.insync.replicas {reported}"
    want = f"{factor} and {min_insync}"
    # An acked write is held by min.insync.replicas brokers: by at most all replicas.
    held = replicas if topic_min is None else topic_min
    if held < min_insync:
        at_most = "at most " if topic_min is None else ""
        meaning = f"survives the loss of {at_most}{_brokers(held - 1)}, not {min_insync - 1}"
    elif topic_min is not None:
        meaning = f"fails after {_brokers(replicas - held + 1)} lost, not {factor - min_insync + 1}"
    else:
        meaning = "fails after fewer broker losses"
    log.warning(
        "topic %s has %s, the settings say %s: an acks=all write to it %s",
        topic,
        has,
        want,
        meaning,
    )


def _brokers(count: int) -> str:
    return f"{count} broker" if count == 1 else f"{count} brokers"


async def read_to_end(
    settings: KafkaSettings,
    topic: str,
    partitions: list[int] | None = None,
    start: Mapping[int, int] | None = None,
    ends: dict[int, int] | None = None,
) -> AsyncIterator[ConsumerRecord]:
    """Every record of `partitions` of `topic` (all when None), oldest first, from offset
    `start[p]` (the beginning when not given) up to the end they have now; without a
    consumer group. The ends read are stored in `ends`, when given."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), enable_auto_commit=False, fetch_max_wait_ms=50
    )
    try:
        await consumer.start()
        if partitions is None:
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return  # a topic that does not exist (yet) has no partitions
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            if start and start.get(tp.partition):
                consumer.seek(tp, start[tp.partition])
        last = await consumer.end_offsets(tps)
        # From a given start, fetch at least once: the end reported may be short (below).
        pending = {tp for tp in tps if last[tp] > 0 or (start and tp.partition in start)}
        while pending:
            # Bounded batches keep a restore's peak memory low (25% less than unbounded).
            batches = await consumer.getmany(*pending, timeout_ms=200, max_records=500)
            for records in batches.values():
                for record in records:
                    yield record
            for tp in list(pending):
                # Some brokers under-report end_offsets after a batched write: the
                # high-water mark of a fetch is the end that counts.
                last[tp] = max(last[tp], consumer.highwater(tp) or 0)
                if await consumer.position(tp) >= last[tp]:
                    pending.discard(tp)
        if ends is not None:
            ends.update({tp.partition: last[tp] for tp in tps})
    finally:
        await stop_consumer(consumer)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, carried through even when Kafka has just become unreachable.

    aiokafka (aio-libs/aiokafka#647) lets the cancellation of a fetch that is backing
    off after a failure escape from `stop()`, half-way: the caller's task would look
    cancelled and the connections would stay open. Only a cancellation of our own
    task that came during `stop()` is passed on: one from before (Ctrl-C cancels a
    command's task, which then stops its consumer) must not cut the stop short.
    """
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if task is not None and task.cancelling() > cancelling:
            raise
        # Its fetch loop too: the one still pending would be lost with the consumer.
        fetcher = consumer._fetcher
        fetches = [fetcher._fetch_task, *fetcher._pending_tasks]
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        await consumer._client.close()


_M = 0x5BD1E995
# The struct reading a key's 4-byte words, by their count: built once, not each call.
_WORDS: dict[int, Callable[[bytes], tuple[int, ...]]] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data`, as the Java client and aiokafka compute it.

    aiokafka's own takes the bytes one at a time, in Python; this one takes 4-byte
    words at once, in half the time. The same value, so a key lands on the same
    partition whichever client wrote it (tests/test_kafka_partitions.py).
    """
    m = _M  # a local: read once a word
    length = len(data)
    h = 0x9747B28C ^ length
    count = length >> 2
    words = _WORDS.get(count)
    if words is None:
        words = _WORDS[count] = struct.Struct(f"<{count}I").unpack_from
    for k in words(data):
        k = k * m & 0xFFFFFFFF
        # (a & mask) ^ (b & mask) == (a ^ b) & mask: one mask, not two.
        h = (h * m ^ (k ^ k >> 24) * m) & 0xFFFFFFFF
    tail = length & 3
    if tail:
        end = length - tail
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = (h ^ data[end]) * m & 0xFFFFFFFF
    h = (h ^ h >> 13) * m & 0xFFFFFFFF
    return h ^ h >> 15


def partition_for(key: bytes | None, partitions: Sequence[int], available: Sequence[int]) -> int:
    """The partition of a record keyed `key`: Kafka's default partitioner (a random
    available one for no key), as aiokafka's `DefaultPartitioner` chooses."""
    if key is None:
        return random.choice(available or partitions)  # noqa: S311  # not a secret
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class Producer:
    """The process's one Kafka producer: acks=all, idempotence as configured."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._deadlines = Deadlines()

    async def start(self) -> None:
        if self._producer is not None:
            return
        # Made here, not in __init__: aiokafka warns about a client never closed.
        producer = AIOKafkaProducer(
            **client_options(self._settings),
            acks="all",
            enable_idempotence=self._settings.enable_idempotence,
            # No linger: a record waiting 2 ms for company cost the receiver ~3% of its
            # CPU a callback (a timer each) and every send 2 ms; under load records
            # batch anyway while a request is in flight (benchmarks/README.md).
            linger_ms=0,
            # While a partition's batch is in flight the next one fills, and a full one
            # makes each further send wait for it to drain (aiokafka sends one request
            # at a time to a broker). A worker's hints come a partition at a time, so
            # its events do too: at 64 KiB, 1 send in 3 of a busy worker waited, at 256
            # KiB almost none did, -13% CPU an order (benchmarks/README.md). A quarter
            # of Kafka's default message.max.bytes (1 MB).
            max_batch_size=256 * 1024,
            request_timeout_ms=30_000,
            partitioner=partition_for,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise StartupError(
                f"Kafka producer cannot start: {type(exc).__name__}: {exc}"
            ) from None
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def _running(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("the producer is not started")
        return self._producer

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timeout: float | None = None,
        partition: int | None = None,
    ) -> RecordMetadata:
        """Sends one record and waits for the broker's ack (at most `timeout` seconds).

        A send that times out may still be delivered later: callers must tolerate that.
        `partition` None leaves it to the key's hash.
        """
        sent = self._running.send_and_wait(
            topic, value, key=key.encode(), headers=headers, partition=partition
        )
        metadata: RecordMetadata = await (
            sent if timeout is None else self._deadlines.within(timeout, sent)
        )
        return metadata

    async def flush(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for every record sent to be acked or failed;
        whether they all were."""
        try:
            await asyncio.wait_for(self._running.flush(), timeout)
        except TimeoutError:
            return False
        return True

    async def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the cluster answers a metadata request now."""
        try:
            metadata = self._running.client.fetch_all_metadata()
            return bool(await asyncio.wait_for(metadata, timeout))
        except (KafkaError, OSError, TimeoutError, RuntimeError):
            return False
