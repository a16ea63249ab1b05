"""The `order-bridge` command as a user runs it: a real process against the sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from bridge.broker import _answers as answers
from bridge.config import KafkaSettings
from bridge.errors import StartupError
from bridge.sandbox import Sandbox
from bridge.servers import serve
from tests.bridge_fixtures import bridge_config, config_toml
from tests.conftest import RunningSandbox
from tests.helpers import KASUSHOU_API_KEY, LEMFT_KEY, LUNPAY_SECRET, SECRETS


async def order_bridge(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write_config(path: Path, sandbox: RunningSandbox, *, kasushou_key: str = "env:KSU_KEY") -> Path:
    lemft, lunpay, ksu = (sandbox.accounts[p] for p in ("lemft", "lunpay", "kasushou"))
    path.write_text(
        f"""
[[accounts]]
name = "{lemft.name}"
provider = "lemft"
base_url = "{lemft.base_url}"
customer_id = {lemft.settings.customer_id}
app_id = {lemft.settings.app_id}
key = "env:LEMFT_KEY"

[[accounts]]
name = "{lunpay.name}"
provider = "lunpay"
base_url = "{lunpay.base_url}"
merchant_id = "{lunpay.settings.merchant_id}"
account_id = "{lunpay.settings.account_id}"
secret = "env:LUNPAY_SECRET"

[[accounts]]
name = "{ksu.name}"
provider = "kasushou"
base_url = "{ksu.base_url}"
user_id = {ksu.settings.user_id}
api_key = "{kasushou_key}"
"""
    )
    return path


ENV = {"LEMFT_KEY": LEMFT_KEY, "LUNPAY_SECRET": LUNPAY_SECRET, "KSU_KEY": KASUSHOU_API_KEY}


@pytest.mark.parametrize("provider", ["lemft", "lunpay", "kasushou"])
async def test_query_prints_the_snapshot(
    sandbox: RunningSandbox, tmp_path: Path, provider: str
) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox)
    account = sandbox.accounts[provider]
    order = sandbox.sandbox.create_order(account.name)
    code, out, err = await order_bridge(
        "query", provider, account.name, order.order_id, "--config", str(config), env=ENV
    )
    assert (code, err) == (0, "")
    snapshot = json.loads(out)
    assert snapshot["order_id"] == order.order_id
    assert snapshot["provider"] == provider
    assert snapshot["account"] == account.name
    assert snapshot["amount"] == "10.00"
    assert_no_secret(out)


async def test_config_from_the_environment(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox)
    order = sandbox.sandbox.create_order("lunpay-test")
    code, out, _ = await order_bridge(
        "query", "lunpay", "lunpay-test", order.order_id,
        env={**ENV, "ORDER_BRIDGE_CONFIG": str(config)},
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["order_id"] == order.order_id


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["lemft", "nope", "ord_1"], "unknown account 'nope' for provider 'lemft'"),
        (["kasushou", "kasushou-test", "D-MISSING"], "the provider does not know it"),
        (["lunpay", "lunpay-test", "LP-MISSING"], "the provider does not know it"),
    ],
)
async def test_query_errors_are_one_line(
    sandbox: RunningSandbox, tmp_path: Path, args: list[str], expected: str
) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox)
    code, out, err = await order_bridge("query", *args, "--config", str(config), env=ENV)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert expected in err
    assert_no_secret(err)


async def test_credentials_refused(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox, kasushou_key="not-the-key")
    order = sandbox.sandbox.create_order("kasushou-test")
    code, _, err = await order_bridge(
        "query", "kasushou", "kasushou-test", order.order_id, "--config", str(config), env=ENV
    )
    assert code == 1
    assert "code 400" in err
    assert "not-the-key" not in err


async def test_provider_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[[accounts]]\nname = "l"\nprovider = "lunpay"\nbase_url = "http://127.0.0.1:9"\n'
        'merchant_id = "M"\naccount_id = "A"\nsecret = "env:LUNPAY_SECRET"\n'
    )
    code, _, err = await order_bridge(
        "query", "lunpay", "l", "LP-1", "--config", str(config), env=ENV
    )
    assert code == 1
    assert "unreachable" in err
    assert err.count("\n") == 1


async def test_missing_secret_stops_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[[accounts]]\nname = "l"\nprovider = "lunpay"\nbase_url = "http://127.0.0.1:9"\n'
        'merchant_id = "M"\naccount_id = "A"\nsecret = "env:UNSET_SECRET_VAR"\n'
    )
    code, _, err = await order_bridge("query", "lunpay", "l", "LP-1", "--config", str(config))
    assert code == 2
    assert err == (
        "order-bridge: config: accounts[0].secret: "
        "environment variable UNSET_SECRET_VAR is not set\n"
    )


async def test_a_config_without_accounts_stops_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n')
    code, _, err = await order_bridge("query", "lemft", "l", "1", "--config", str(config))
    assert code == 2
    assert err == (
        "order-bridge: config: accounts: none configured: "
        "add an [[accounts]] table for each account\n"
    )


async def test_a_secret_in_the_wrong_place_is_not_printed(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[[accounts]]\nname = "l"\nprovider = "lemft"\nbase_url = "https://lemft.example"\n'
        'customer_id = 1\napp_id = "env:LEMFT_KEY"\nkey = "env:LEMFT_KEY"\n'
    )
    code, _, err = await order_bridge("query", "lemft", "l", "1", "--config", str(config), env=ENV)
    assert code == 2
    assert err == (
        "order-bridge: config: accounts[0].app_id: expected an integer, "
        "got the value of env:LEMFT_KEY (not shown)\n"
    )


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


async def test_check_config_probes_each_account(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox)
    code, out, err = await order_bridge("check-config", "--config", str(config), env=ENV)
    assert (code, out, err) == (0, "config ok: 3 accounts\n", "")
    code, out, err = await order_bridge("check-config", "--probe", "--config", str(config), env=ENV)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "config ok: 3 accounts",
        "lemft/lemft-test: ok",
        "lunpay/lunpay-test: ok",
        "kasushou/kasushou-test: ok",
    ]


async def test_check_config_says_which_account_fails(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "bridge.toml", sandbox, kasushou_key="not-the-key")
    code, out, _ = await order_bridge("check-config", "--probe", "--config", str(config), env=ENV)
    assert code == 1
    lines = out.splitlines()
    assert lines[:3] == ["config ok: 3 accounts", "lemft/lemft-test: ok", "lunpay/lunpay-test: ok"]
    assert lines[3].startswith("kasushou/kasushou-test: code 400")
    assert len(lines) == 4
    assert "not-the-key" not in out
    code, _, err = await order_bridge("check-config", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert err.startswith("order-bridge: config: ")
    assert err.count("\n") == 1


def bridge_config_file(
    sandbox: RunningSandbox, kafka: KafkaSettings, path: Path, extra: str = ""
) -> dict[str, str]:
    text, env = config_toml(bridge_config(sandbox, kafka))
    path.write_text(text + extra)
    return env


@pytest.mark.parametrize(
    ("before", "after", "config_format", "shown_as", "info"),
    [
        ([], ["-v"], "json", "json", True),
        (["-v", "--log-format", "text"], [], "json", "text", True),
        ([], ["--log-format", "json"], "text", "json", False),
        ([], [], "text", "text", False),
    ],
)
async def test_log_lines(
    sandbox: RunningSandbox,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    before: list[str],
    after: list[str],
    config_format: str,
    shown_as: str,
    info: bool,
) -> None:
    """-v and --log-format before or after the command; --log-format over [log] format;
    the lifecycle lines always shown."""
    config = tmp_path / "bridge.toml"
    env = bridge_config_file(
        sandbox, kafka_settings, config, f'[log]\nformat = "{config_format}"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *before, "serve", "--config", str(config), *after,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[bytes] = []
    while b" running on http://127.0.0.1:" not in (lines or [b""])[-1]:
        lines.append(await asyncio.wait_for(process.stderr.readline(), 30))
        assert lines[-1], lines
    process.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    text = (b"".join(lines) + rest).decode()
    if shown_as == "json":
        records = [json.loads(line) for line in text.splitlines()]
        assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
        assert all(r["time"].endswith("Z") for r in records)
        loggers = {r["logger"] for r in records}
        messages = [r["message"] for r in records]
    else:
        assert not text.startswith("{")
        loggers = {line.split(" ")[3].rstrip(":") for line in text.splitlines()}
        messages = [line.split(": ", 1)[1] for line in text.splitlines()]
    assert "bridge.service" in loggers
    assert any(m.startswith("order-bridge receiver and worker running on ") for m in messages)
    assert any(m.startswith("stopping") for m in messages)
    assert ("bridge.kafka" in loggers) is info  # "created topics ..." at INFO


async def test_a_port_taken_is_one_line_at_once(
    sandbox: RunningSandbox, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.toml"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = bridge_config_file(sandbox, kafka_settings, config)
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        started = time.monotonic()
        code, out, err = await order_bridge("receiver", "--config", str(config), env=env)
        assert time.monotonic() - started < 10
    assert (code, out) == (1, "")
    assert err == (
        f"order-bridge: cannot listen on 127.0.0.1:{port} (http.port): Address already in use\n"
    )
    config.write_text(config.read_text().replace(f"port = {port}", "port = 70000"))
    code, out, err = await order_bridge("serve", "--config", str(config), env=env)
    assert (code, out) == (2, "")
    assert (
        err
        == "order-bridge: config: http.port: is 70000: a port is 0 to 65535 (0 picks a free one)\n"
    )


async def test_serve_on_a_port_taken_raises_at_once() -> None:
    """Where a bridge binds (without the command's check first): one StartupError."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match="Address already in use"):
            async with serve(Sandbox([]).app, port=port):
                pass


async def test_broker_runs_until_interrupted() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "broker", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    address = first.split()[3]
    assert first.startswith(f"embedded broker on {address} ")
    assert await answers(address)
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, err) == (0, b"")
    assert b'bootstrap_servers = "' + address.encode() + b'"' in out

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, out_text, err_text = await order_bridge("broker", "--port", str(port))
    assert (code, out_text) == (1, "")
    assert err_text == (
        f"order-bridge: cannot listen on 127.0.0.1:{port} (--port): Address already in use\n"
    )
