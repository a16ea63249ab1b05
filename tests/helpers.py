"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bridge.accounts import Account, Secret
from bridge.providers.base import ProviderResponse
from bridge.providers.kasushou import KasushouSettings
from bridge.providers.lemft import LemftSettings
from bridge.providers.lunpay import LunpaySettings

FIXTURES = Path(__file__).parent / "fixtures"

LEMFT_KEY = "ae9ae3f5ad284ef4836de18aa3d41c47"
LUNPAY_SECRET = "lunpay-test-secret-7f3a"
KASUSHOU_API_KEY = "H0YnuPpcVtx7rQdMTbjN6932s5oDOqFa"

# Every credential the tests use: none of them may ever show up in output.
SECRETS = (LEMFT_KEY, LUNPAY_SECRET, KASUSHOU_API_KEY)


def make_accounts(base_url: str = "http://sandbox.invalid") -> dict[str, Account]:
    """One account per provider, keyed by provider name."""
    return {
        "lemft": Account(
            name="lemft-test",
            provider="lemft",
            base_url=f"{base_url}/lemft",
            settings=LemftSettings(customer_id=10000011, app_id=100001, key=Secret(LEMFT_KEY)),
        ),
        "lunpay": Account(
            name="lunpay-test",
            provider="lunpay",
            base_url=f"{base_url}/lunpay",
            settings=LunpaySettings(
                merchant_id="M1001", account_id="A77", secret=Secret(LUNPAY_SECRET)
            ),
        ),
        "kasushou": Account(
            name="kasushou-test",
            provider="kasushou",
            base_url=f"{base_url}/kasushou",
            settings=KasushouSettings(user_id=10000, api_key=Secret(KASUSHOU_API_KEY)),
        ),
    }


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def answer(
    body: Any, status: int = 200, content_type: str = "application/json"
) -> ProviderResponse:
    """A provider's HTTP answer: `body` as JSON unless it is already bytes."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return ProviderResponse(status_code=status, content_type=content_type, content=content)


PROXY_PAGE = answer(
    b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502, "text/html; charset=utf-8"
)
PROXY_PAGE_200 = answer(b"<html><body>Maintenance</body></html>", 200, "text/html")
GARBAGE = answer(b"\x00\xffnot json at all", 200, "application/json")


def json_headers() -> dict[str, str]:
    return {"content-type": "application/json"}


def form_headers() -> dict[str, str]:
    return {"content-type": "application/x-www-form-urlencoded"}
