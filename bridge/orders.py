"""What the bridge knows about an order: normalized status and the confirmed snapshot."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


class Status(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    ON_HOLD = "on_hold"
    PARTIALLY_PAID = "partially_paid"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"
    UNKNOWN = "unknown"

    @property
    def rank(self) -> int | None:
        """Position in the forward-only order of states; `None` for `unknown`."""
        return _RANKS.get(self)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


_RANKS = {
    Status.PENDING: 0,
    Status.PROCESSING: 1,
    Status.ON_HOLD: 1,
    Status.PARTIALLY_PAID: 1,
    Status.SUCCEEDED: 2,
    Status.FAILED: 2,
    Status.CANCELLED: 2,
    Status.REFUNDED: 3,
}

FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.REFUNDED})


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """The provider's own status: its code (kept raw when unmapped) and its meaning."""

    code: int | str
    label: str


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    """One order as the provider's signed query confirmed it."""

    provider: str
    account: str
    order_id: str
    external_order_id: str
    status: Status
    provider_status: ProviderStatus
    amount: Decimal | None
    currency: str
    # Provider-specific fields, JSON-ready (amounts as strings), card secrets masked.
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The Kafka key of this order: `provider/account/order_id`."""
        return order_key(self.provider, self.account, self.order_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "account": self.account,
            "order_id": self.order_id,
            "external_order_id": self.external_order_id,
            "status": self.status.value,
            "provider_status": {
                "code": self.provider_status.code,
                "label": self.provider_status.label,
            },
            # Fixed-point, never exponent notation: "1E+3" is no decimal string.
            "amount": None if self.amount is None else format(self.amount, "f"),
            "currency": self.currency,
            "details": dict(self.details),
        }


def order_key(provider: str, account: str, order_id: str) -> str:
    return f"{provider}/{account}/{order_id}"


@dataclass(frozen=True, slots=True)
class CallbackHint:
    """A parsed callback: which order it names, and a copy of it fit for storing."""

    order_id: str
    # What the callback claims; never trusted, only recorded.
    claimed_status: str | None
    # The body with card secrets masked, in its original encoding.
    stored_body: bytes
    content_type: str
    # How the signature was verified, when the provider signs callbacks.
    signature_rule: str | None = None
