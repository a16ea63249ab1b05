"""Records land on the partitions Kafka's other clients choose for their keys."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from bridge.kafka import murmur2, partition_for


def test_murmur2_is_the_java_clients() -> None:
    # org.apache.kafka.common.utils.Utils.murmur2, as Java's signed ints.
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    java[b"a-little-bit-longer-string"] = -1486304829
    java[b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"] = -58897971
    java[b"abc"] = 479470107
    for key, expected in java.items():
        assert murmur2(key) == expected & 0xFFFFFFFF, key


def test_keys_go_where_aiokafka_sends_them() -> None:
    rng = random.Random(9)
    keys = [rng.randbytes(rng.randrange(0, 100)) for _ in range(3000)]
    keys += [f"lunpay/lunpay-demo/{n:016d}".encode() for n in range(1000)]
    keys += ["kasushou/main/订单-é".encode()]
    aiokafka = DefaultPartitioner()
    for partitions in ([0], list(range(3)), list(range(12)), list(range(100))):
        for key in keys:
            assert murmur2(key) == aiokafka_murmur2(key), key
            assert partition_for(key, partitions, partitions) == aiokafka(key, partitions, [])


def test_a_record_without_key_goes_to_an_available_partition() -> None:
    assert {partition_for(None, [0, 1, 2], [2]) for _ in range(20)} == {2}
    assert {partition_for(None, [0, 1, 2], []) for _ in range(200)} == {0, 1, 2}
