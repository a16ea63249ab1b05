"""Shared fixtures: test accounts for each provider, and the sandbox providers on loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bridge.config import Account
from bridge.sandbox import Sandbox
from bridge.servers import serve
from tests.helpers import make_accounts


@dataclass
class RunningSandbox:
    sandbox: Sandbox
    url: str
    # The test accounts, pointed at this sandbox.
    accounts: dict[str, Account]


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    accounts = make_accounts()
    box = Sandbox(list(accounts.values()))
    async with serve(box.app) as url:
        pointed = {
            provider: dataclasses.replace(account, base_url=f"{url}/{provider}")
            for provider, account in accounts.items()
        }
        yield RunningSandbox(box, url, pointed)
