"""What every sandbox provider module offers the app: reading a query, answering it,
and writing the callbacks the real provider would post."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from starlette.responses import Response

from bridge.sandbox.book import SandboxOrder

if TYPE_CHECKING:
    from bridge.accounts import Account

Encoding = Literal["json", "form"]


@dataclass(frozen=True)
class Query:
    """What a provider made of one order-detail request."""

    # The account its non-secret ids (user id, merchant id, ...) name, verified or not.
    account: Account | None
    order_ids: tuple[str, ...] = ()
    # The answer when the request is refused (bad signature, malformed, ...), and why.
    rejection: Response | None = None
    outcome: str = "ok"
    # kasushou only: ids are external order numbers; look back this many days (0: all).
    by_external: bool = False
    days: int = 0


class Shown(NamedTuple):
    """An order as one answer shows it: the current status, or the previous one when stale."""

    order: SandboxOrder
    status: int


class SandboxProvider(Protocol):
    name: str
    # The query route under /{name}, in Starlette's path syntax.
    path: str
    # The status of an order just created.
    initial_status: int

    def new_order_id(self, rng: random.Random) -> str:
        """A fresh order id in the provider's style."""

    def order_defaults(self, rng: random.Random, amount: Decimal) -> dict[str, Any]:
        """The provider-specific fields generated for a new order (card data, site ids, ...)."""

    def read_query(
        self,
        accounts: Sequence[Account],
        body: bytes,
        headers: Mapping[str, str],
        path_params: Mapping[str, Any],
    ) -> Query:
        """Identifies and authenticates a query; never raises on a malformed request."""

    def answer(self, query: Query, found: Sequence[Shown]) -> tuple[Response, str]:
        """The answer to an accepted query about the orders found, and its outcome."""

    def server_error(self) -> Response:
        """HTTP 500 with the provider's own error envelope."""

    def refusal(self) -> Response:
        """The provider's error envelope refusing a whole request (a permanent error)."""

    def callback(
        self, account: Account, order: SandboxOrder, status: int, encoding: Encoding, bad_sign: bool
    ) -> tuple[bytes, str]:
        """The callback body the provider would post, and its content type."""


def text_field(fields: Mapping[str, Any], name: str) -> str | None:
    """A request field as text: strings as they are, integers written out; else None."""
    value = fields.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) else None


def random_digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))


def random_token(rng: random.Random, count: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(rng.choice(alphabet) for _ in range(count))
