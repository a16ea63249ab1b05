"""`order-bridge dev`: the whole bridge on one machine with no setup, and a short story.

It starts the embedded broker, the sandbox providers with demo accounts, and the
bridge, then plays callbacks (a duplicate, a forged success, a refund, a bad
signature) and prints each event as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bridge.accounts import Account, Secret
from bridge.broker import embedded_broker, free_port
from bridge.config import Config, load_config
from bridge.providers.kasushou import KasushouSettings
from bridge.providers.lemft import LemftSettings
from bridge.providers.lunpay import LunpaySettings
from bridge.sandbox import Sandbox
from bridge.servers import serve
from bridge.service import Bridge, stop_on_signals
from bridge.tail import Event, each_event

# Demo credentials: fake, known only to the sandbox on this machine.
_DEMO_SECRETS = {
    "lemft-demo.key": "demo-lemft-key-0408ab79eb214e7d",
    "lunpay-demo.secret": "demo-lunpay-secret-5c1e",
    "kasushou-demo.api_key": "demo-kasushou-key-H0YnuPpcVtx7",
}

_CONFIG = """\
# Written by `order-bridge dev`: the embedded broker and demo accounts at the sandbox.
# Secrets are read from files next to this one, never written here.
[kafka]
bootstrap_servers = "{bootstrap}"
enable_idempotence = false   # the embedded broker has no idempotent producer
replication_factor = 1

[http]
port = {port}

[worker]
retry_budget = 60

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


def write_config(directory: Path, *, sandbox_url: str, bootstrap: str, port: int) -> Path:
    """The dev config file, its secrets in files beside it."""
    for name, value in _DEMO_SECRETS.items():
        path = directory / name
        path.write_text(value + "\n", encoding="utf-8")
        path.chmod(0o600)
    config = directory / "order-bridge-dev.toml"
    text = _CONFIG.format(url=sandbox_url, dir=directory, bootstrap=bootstrap, port=port)
    config.write_text(text, encoding="utf-8")
    return config


async def run(*, once: bool = False, port: int = 0) -> None:
    stop = stop_on_signals()
    sandbox = Sandbox(demo_accounts())
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="order-bridge-dev-")))
        broker = await stack.enter_async_context(embedded_broker())
        sandbox_url = await stack.enter_async_context(serve(sandbox.app))
        config_path = write_config(
            tmp,
            sandbox_url=sandbox_url,
            bootstrap=broker.bootstrap_servers,
            port=port or free_port(),
        )
        config = load_config(config_path)
        print(f"embedded Kafka broker   {broker.bootstrap_servers}")
        print(f"sandbox providers       {sandbox_url}")
        print(f"config                  {config_path}")
        print("starting the bridge (joining the consumer group takes a few seconds)...")
        bridge = await stack.enter_async_context(Bridge(config))
        print(f"bridge                  {bridge.url}\n")
        events = await stack.enter_async_context(EventLog.following(config))
        async with httpx.AsyncClient(timeout=10) as http:
            story = Story(sandbox, bridge, http, events)
            if not await _until_stopped(story.play(), stop):
                return
        print_try_it(bridge.url or "", sandbox_url, config_path, story)
        print("demo story done", flush=True)
        if not once:
            print("Events keep printing here. Ctrl-C to stop.", flush=True)
            await stop.wait()


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Runs `work` unless `stop` is set first; whether it ran to its end."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


class EventLog:
    """Prints every status event as it arrives and lets the story wait for them."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = defaultdict(int)
        self._changed = asyncio.Condition()

    @classmethod
    @contextlib.asynccontextmanager
    async def following(cls, config: Config) -> AsyncIterator[EventLog]:
        log = cls()
        async with each_event(config.kafka, log._seen):
            yield log

    async def _seen(self, event: Event) -> None:
        print(f"  event  {event.describe()}", flush=True)
        async with self._changed:
            self._counts[event.key] += 1
            self._changed.notify_all()

    async def wait(self, key: str, count: int, timeout: float = 30.0) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self._counts[key] >= count), timeout
            )

    def count(self, key: str) -> int:
        return self._counts[key]


class Story:
    """The scripted demo: each step says what it does, then shows what the bridge made of it."""

    def __init__(
        self, sandbox: Sandbox, bridge: Bridge, http: httpx.AsyncClient, events: EventLog
    ) -> None:
        self.sandbox = sandbox
        self.bridge = bridge
        self.accounts = {a.provider: a.name for a in bridge.config.accounts}
        self.http = http
        self.events = events
        self.orders: dict[str, str] = {}

    async def play(self) -> None:
        lemft = self.create("lemft", 0, Decimal("20.00"))
        await self.step("lemft: a card order is created; its callback arrives", "lemft", lemft)
        self.sandbox.set_status("lemft-demo", lemft, 1)
        await self.step("lemft: the order completes; its callback arrives", "lemft", lemft)
        await self.step("lemft: the same callback again, as providers do", "lemft", lemft)

        lunpay = self.create("lunpay", 1, Decimal("375.28"))
        await self.step(
            "lunpay: a forged callback claims 'completed' while lunpay says awaiting payment",
            "lunpay",
            lunpay,
            claimed=4,
        )

        kasushou = self.create("kasushou", 3, Decimal("99.50"))
        await self.step(
            "kasushou: a card-code order succeeds; signed callback", "kasushou", kasushou
        )
        self.sandbox.set_status("kasushou-demo", kasushou, 5)
        await self.step("kasushou: the order is refunded", "kasushou", kasushou)
        print("\n> kasushou: a callback with a bad signature", flush=True)
        body, content_type = self.sandbox.callback("kasushou-demo", kasushou, bad_sign=True)
        answer = await self.post("kasushou", body, content_type)
        print(f"  HTTP {answer.status_code}: kept in the dead-letter topic, no event", flush=True)

    def create(self, provider: str, status: int, amount: Decimal) -> str:
        order = self.sandbox.create_order(self.accounts[provider], status=status, amount=amount)
        self.orders[provider] = order.order_id
        return order.order_id

    async def step(
        self, title: str, provider: str, order_id: str, claimed: int | None = None
    ) -> None:
        """Posts a callback, waits until the bridge has handled it, shows the outcome."""
        print(f"\n> {title}", flush=True)
        metrics = self.bridge.metrics
        key = f"{provider}/{self.accounts[provider]}/{order_id}"
        events_before = self.events.count(key)
        hints_before = metrics.total("order_bridge_hints_total")
        published_before = metrics.total("order_bridge_events_published_total")
        body, content_type = self.sandbox.callback(
            self.accounts[provider], order_id, status=claimed
        )
        answer = await self.post(provider, body, content_type)
        print(f"  HTTP {answer.status_code} {answer.text!r}", flush=True)
        deadline = time.monotonic() + 30
        while metrics.total("order_bridge_hints_total") == hints_before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bridge did not handle the callback for {key}")
            await asyncio.sleep(0.05)
        if metrics.total("order_bridge_events_published_total") > published_before:
            await self.events.wait(key, events_before + 1)
        else:
            print("  no event: the provider confirms nothing changed", flush=True)

    async def post(self, provider: str, body: bytes, content_type: str) -> httpx.Response:
        return await self.http.post(
            f"{self.bridge.url}/callbacks/{provider}/{self.accounts[provider]}",
            content=body,
            headers={"content-type": content_type},
        )


def print_try_it(bridge_url: str, sandbox_url: str, config_path: Path, story: Story) -> None:
    lunpay = story.orders["lunpay"]
    print(
        f"""
Try it yourself, in another shell, while this runs:
  # move the lunpay order to completed at the provider, then tell the bridge
  curl -s -X POST {sandbox_url}/_sandbox/orders/lunpay-demo/{lunpay} \\
       -H 'content-type: application/json' -d '{{"status": 4}}'
  curl -s -X POST {bridge_url}/callbacks/lunpay/lunpay-demo \\
       -H 'content-type: application/json' -d '{{"order_no": "{lunpay}"}}'
  # a new order at the provider (note the order_id it answers), then its signed callback
  curl -s -X POST {sandbox_url}/_sandbox/orders \\
       -H 'content-type: application/json' -d '{{"account": "kasushou-demo", "status": 3}}'
  curl -s -X POST {sandbox_url}/_sandbox/callbacks -H 'content-type: application/json' \\
       -d '{{"account": "kasushou-demo", "order_id": "ORDER_ID",
            "url": "{bridge_url}/callbacks/kasushou/kasushou-demo"}}'
  # ask the bridge to follow an order whose callback never comes
  curl -s -X POST {bridge_url}/orders/watch -H 'content-type: application/json' \\
       -d '{{"provider": "lunpay", "account": "lunpay-demo", "order_id": "{lunpay}"}}'
  # one signed query, and the events as they come
  .venv/bin/order-bridge query --config {config_path} lunpay lunpay-demo {lunpay}
  .venv/bin/order-bridge tail --config {config_path} --from-beginning
  curl -s {bridge_url}/metrics
"""
    )
