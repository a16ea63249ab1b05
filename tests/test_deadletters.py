"""`order-bridge deadletters` and `order-bridge replay` as an operator runs them: real
processes against a running bridge, the session broker and the sandbox providers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.sandbox.book import Faults
from tests.bridge_fixtures import RunningBridge, config_toml
from tests.test_cli import assert_no_secret, order_bridge


@pytest.fixture
def config(bridge: RunningBridge, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The running bridge's config as a file: `--config PATH` and its environment."""
    text, env = config_toml(bridge.bridge.config)
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return str(path), env


async def refused(bridge: RunningBridge, provider: str) -> str:
    """An order the provider refuses to answer for: a `rejected` dead letter; its key."""
    order_id, key = bridge.create(provider, "succeeded")
    account = bridge.sandbox.accounts[provider].name
    bridge.sandbox.sandbox.set_faults(account, Faults(refuse_ids=(order_id,)))
    assert (await bridge.post_callback(provider, order_id)).status_code == 200
    await bridge.deadletter.wait_for(lambda rs: any(r.key == key for r in rs))
    return key


async def malformed(bridge: RunningBridge) -> None:
    """A callback refused at the door: a `malformed` dead letter with no inbox record."""
    answer = await bridge.http.post(
        bridge.callback_url("lemft"),
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400
    await bridge.deadletter.wait_for(
        lambda rs: any(r.value.get("reason") == "malformed" for r in rs)
    )


def heal(bridge: RunningBridge, *providers: str) -> None:
    for provider in providers:
        bridge.sandbox.sandbox.set_faults(bridge.sandbox.accounts[provider].name, Faults())


async def test_lists_newest_first_with_filters(
    bridge: RunningBridge, config: tuple[str, dict[str, str]]
) -> None:
    path, env = config
    key = await refused(bridge, "lunpay")
    await malformed(bridge)

    async def letters(*args: str) -> list[str]:
        code, out, err = await order_bridge("deadletters", *args, "--config", path, env=env)
        assert code == 0, err
        return out.splitlines()

    newest, oldest = await letters()
    assert "  malformed  lemft/lemft-test/-  attempts 0  " in newest
    assert f"  rejected  {key}  attempts 0  " in oldest
    assert oldest.startswith(time.strftime("%Y-"))
    assert await letters("--reason", "rejected") == [oldest]
    assert await letters("--provider", "lemft") == [newest]
    assert await letters("--order", key) == [oldest]
    assert await letters("--order", key.rsplit("/", 1)[1]) == [oldest]
    assert await letters("--account", "kasushou-test") == []
    assert await letters("--since", "1h", "--until", "2999-01-01") == [newest, oldest]
    assert await letters("--until", "2000-01-01T00:00:00+08:00") == []
    (line,) = await letters("--json", "--reason", "malformed")
    record = json.loads(line)
    assert (record["reason"], record["provider"], record["replayed_at"]) == (
        "malformed",
        "lemft",
        None,
    )
    assert set(record["position"]) == {"partition", "offset"}
    assert_no_secret(line)


async def test_replay_writes_each_dead_letter_back_once(
    bridge: RunningBridge, config: tuple[str, dict[str, str]]
) -> None:
    path, env = config
    key = await refused(bridge, "kasushou")
    await malformed(bridge)
    heal(bridge, "kasushou")

    code, out, err = await order_bridge("replay", "--dry-run", "--config", path, env=env)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "would replay 1 dead letter (rejected 1)",
        "skipped 1 dead letter (malformed 1): no inbox record to replay",
    ]
    code, out, _ = await order_bridge("replay", "--reason", "rejected", "--config", path, env=env)
    assert (code, out) == (0, "replayed 1 dead letter (rejected 1)\n")
    (event,) = await bridge.events_for(key, 1)
    assert (event.value["trigger"], event.value["status"]) == ("replay", "succeeded")

    # Another process, later: what was replayed is not replayed again.
    code, out, _ = await order_bridge("replay", "--config", path, env=env)
    assert code == 0
    assert out.splitlines() == [
        "replayed 0 dead letters",
        "skipped 1 dead letter (rejected 1): replayed before",
        "skipped 1 dead letter (malformed 1): no inbox record to replay",
    ]
    assert await bridge.status.quiet(0.5) == [event]
    code, out, _ = await order_bridge(
        "deadletters", "--reason", "rejected", "--config", path, env=env
    )
    (line,) = out.splitlines()
    assert "(replayed 20" in line


async def test_replay_at_a_rate(bridge: RunningBridge, config: tuple[str, dict[str, str]]) -> None:
    path, env = config
    keys = [await refused(bridge, "lemft") for _ in range(3)]
    heal(bridge, "lemft")
    started = time.monotonic()
    code, out, _ = await order_bridge("replay", "--rate", "2", "--config", path, env=env)
    # Three at two a second: the third leaves a second after the first.
    assert time.monotonic() - started >= 1.0
    assert (code, out) == (0, "replayed 3 dead letters (rejected 3)\n")
    for key in keys:
        await bridge.events_for(key, 1)


@pytest.fixture
async def following(
    config: tuple[str, dict[str, str]],
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`order-bridge deadletters --follow --reason malformed`, once it reads the topic."""
    path, env = config
    # Started as a shell starts a background job, with SIGINT ignored: Ctrl-C stops it
    # all the same, as it stops `serve`.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "deadletters", "--follow", "--reason", "malformed",
            "--config", path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stderr.readline(), 30)
    assert line.startswith(b"following deadletter-"), line
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_follow_prints_new_dead_letters(
    bridge: RunningBridge, following: asyncio.subprocess.Process
) -> None:
    await refused(bridge, "lunpay")  # not a reason asked for
    await malformed(bridge)
    assert following.stdout is not None
    line = await asyncio.wait_for(following.stdout.readline(), 30)
    assert b"  malformed  lemft/lemft-test/-  " in line
    following.send_signal(signal.SIGINT)
    # Both pipes read to their end: on Python 3.11 `wait()` waits for them to close too.
    _, err = await asyncio.wait_for(following.communicate(), 30)
    assert following.returncode == 130, err.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("command", ["deadletters", "replay"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--reason", "lost"], "argument --reason: unknown reason 'lost' (one of: malformed"),
        (["--since", "yesterday"], "argument --since: not a time: 'yesterday'"),
        (["--until", "3x"], "argument --until: not a time: '3x'"),
        (["--order", "lemft/x"], "argument --order: not an order id or provider/account/"),
        (["--provider", "paypal"], "argument --provider: unknown provider 'paypal'"),
        (["--account", "Main Account"], "argument --account: not an account name"),
    ],
)
async def test_a_malformed_filter_is_a_usage_error(
    command: str, args: list[str], expected: str
) -> None:
    code, out, err = await order_bridge(command, *args, "--config", "/nonexistent.toml")
    assert (code, out) == (2, "")
    assert err.startswith(f"order-bridge {command}: {expected}")
    assert err.count("\n") == 1


async def test_a_rate_must_be_above_zero() -> None:
    code, _, err = await order_bridge("replay", "--rate", "0")
    assert code == 2
    assert err == (
        "order-bridge replay: argument --rate: not a rate a second above 0: '0' "
        "(see order-bridge replay --help)\n"
    )


@pytest.mark.parametrize("command", ["deadletters", "replay", "tail"])
async def test_kafka_down_is_one_line(tmp_path: Path, command: str) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "127.0.0.1:9"\n'
        '[[accounts]]\nname = "l"\nprovider = "lunpay"\nbase_url = "http://127.0.0.1:9"\n'
        'merchant_id = "M"\naccount_id = "A"\nsecret = "not-a-secret"\n'
    )
    code, out, err = await order_bridge(command, "--config", str(config))
    assert (code, out) == (1, "")
    assert err == "order-bridge: Kafka at 127.0.0.1:9 is not reachable: KafkaConnectionError\n"
