"""The `order-bridge` command as a user runs it: a real process against the sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

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
