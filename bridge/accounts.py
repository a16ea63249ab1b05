"""A merchant account at a provider, and `Secret`, the wrapper that keeps its credentials
out of sight. Its own module, so that config, providers and sealing all import it
without importing each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class Secret:
    """A credential: its value is only reachable through `reveal()`, never through str/repr."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('******')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Account:
    """One merchant account at a provider."""

    name: str
    provider: str
    base_url: str
    # The provider's own credentials and options: a dataclass from its module.
    settings: Any
    # The body answered to an accepted callback; `None` means the provider's default.
    callback_ack: str | None = None
    # Seconds one order-detail query may take before it counts as failed.
    query_timeout: float = 10.0
    # Order-detail queries to this account at once.
    max_concurrent_queries: int = 4
    # Order-detail queries a second to this account (callbacks and polls share them,
    # callbacks first), and how many may go at once after a quiet spell.
    query_rate: float = 5.0
    query_burst: int = 5
    # Order ids one query may carry (kasushou takes several); default: the provider's most.
    max_batch: int | None = None
    # 32 bytes in base64: card numbers and passwords in events are sealed with it for
    # consumers (bridge/sealing.py) rather than masked.
    card_key: Secret | None = None
    # An http:// base_url is refused for a host that is not loopback unless this is
    # set: lemft's key travels in the request body, and no provider signs its answers.
    allow_insecure_http: bool = False

    def secrets(self) -> list[str]:
        """The values of every `Secret` the account holds, its provider settings' included."""
        holders = [self, self.settings] if dataclasses.is_dataclass(self.settings) else [self]
        values = [getattr(h, f.name) for h in holders for f in dataclasses.fields(h)]
        return [v.reveal() for v in values if isinstance(v, Secret) and v.reveal()]
