"""`order-bridge dev`: the sandbox providers and demo accounts on this machine, no setup."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from decimal import Decimal
from pathlib import Path

import httpx

from bridge.config import Account, load_config
from bridge.providers.kasushou import KasushouSettings
from bridge.providers.lemft import LemftSettings
from bridge.providers.lunpay import LunpaySettings
from bridge.query import query_order
from bridge.redact import Secret
from bridge.sandbox import Sandbox
from bridge.servers import serve

# Demo credentials: fake, known only to the sandbox on this machine.
_DEMO_SECRETS = {
    "lemft-demo.key": "demo-lemft-key-0408ab79eb214e7d",
    "lunpay-demo.secret": "demo-lunpay-secret-5c1e",
    "kasushou-demo.api_key": "demo-kasushou-key-H0YnuPpcVtx7",
}

_CONFIG = """\
# Written by `order-bridge dev`: demo accounts at the sandbox providers.
# Secrets are read from files next to this one, never written here.
[[accounts]]
name = "lemft-demo"
provider = "lemft"
base_url = "{url}/lemft"
customer_id = 10000011
app_id = 100001
key = "file:{dir}/lemft-demo.key"

[[accounts]]
name = "lunpay-demo"
provider = "lunpay"
base_url = "{url}/lunpay"
merchant_id = "M1001"
account_id = "A77"
secret = "file:{dir}/lunpay-demo.secret"

[[accounts]]
name = "kasushou-demo"
provider = "kasushou"
base_url = "{url}/kasushou"
user_id = 10000
api_key = "file:{dir}/kasushou-demo.api_key"
"""


def demo_accounts() -> list[Account]:
    """The demo accounts as the sandbox knows them (its base URL does not matter there)."""
    s = _DEMO_SECRETS
    return [
        Account(
            name="lemft-demo",
            provider="lemft",
            base_url="http://sandbox",
            settings=LemftSettings(10000011, 100001, Secret(s["lemft-demo.key"])),
        ),
        Account(
            name="lunpay-demo",
            provider="lunpay",
            base_url="http://sandbox",
            settings=LunpaySettings("M1001", "A77", Secret(s["lunpay-demo.secret"])),
        ),
        Account(
            name="kasushou-demo",
            provider="kasushou",
            base_url="http://sandbox",
            settings=KasushouSettings(10000, Secret(s["kasushou-demo.api_key"])),
        ),
    ]


def write_config(directory: Path, sandbox_url: str) -> Path:
    """A config file for the demo accounts at `sandbox_url`, its secrets in files beside it."""
    for name, value in _DEMO_SECRETS.items():
        path = directory / name
        path.write_text(value + "\n", encoding="utf-8")
        path.chmod(0o600)
    config = directory / "order-bridge-dev.toml"
    config.write_text(_CONFIG.format(url=sandbox_url, dir=directory), encoding="utf-8")
    return config


async def run(*, once: bool = False) -> None:
    sandbox = Sandbox(demo_accounts())
    with tempfile.TemporaryDirectory(prefix="order-bridge-dev-") as tmp:
        async with serve(sandbox.app) as url:
            config_path = write_config(Path(tmp), url)
            accounts = {account.name: account for account in load_config(config_path).accounts}
            print(f"sandbox providers at {url}; demo config at {config_path}")
            orders = [
                sandbox.create_order("lemft-demo", amount=Decimal("20.00"), currency="USD"),
                sandbox.create_order("lunpay-demo", amount=Decimal("375.28"), currency="USD"),
                sandbox.create_order("kasushou-demo", amount=Decimal("99.50"), currency="CNY"),
            ]
            async with httpx.AsyncClient() as http:
                for order in orders:
                    snapshot = await query_order(http, accounts[order.account], order.order_id)
                    amount = f"{snapshot.amount} {snapshot.currency}".strip()
                    print(
                        f"{snapshot.key}  {snapshot.status}  {amount}"
                        f"  (provider code {snapshot.provider_status.code})"
                    )
            print("\nTry it yourself (in another shell, while this runs):")
            for order in orders:
                provider = accounts[order.account].provider
                print(
                    f"  .venv/bin/order-bridge query --config {config_path} "
                    f"{provider} {order.account} {order.order_id}"
                )
            print(
                "  curl -s -X POST "
                f"{url}/_sandbox/orders/{orders[0].account}/{orders[0].order_id} "
                "-H 'content-type: application/json' -d '{\"status\": 1}'"
            )
            print("demo story done")
            if not once:
                print("Ctrl-C to stop.")
                await _wait_for_stop()


async def _wait_for_stop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
