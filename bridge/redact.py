"""Keeping secrets out of sight: the `Secret` wrapper and masking of card data."""

from __future__ import annotations

from typing import Any

import orjson

MASK = "******"

# Field names that hold card secrets or credentials wherever they appear in a payload.
SECRET_FIELDS = frozenset(
    {"card_no", "card_number", "card_password", "cvv", "cvc", "pin", "key", "secret", "api_key"}
)
# Card numbers keep their last four digits so people can still tell cards apart.
_KEEP_LAST_FOUR = frozenset({"card_no", "card_number"})


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


def mask_value(field: str, value: Any) -> Any:
    """The masked form of one secret field's value."""
    if value in (None, ""):
        return value
    text = str(value)
    if field in _KEEP_LAST_FOUR and len(text) > 8:
        return "*" * (len(text) - 4) + text[-4:]
    return MASK


def mask_secrets(value: Any) -> Any:
    """A copy of a decoded JSON payload with every secret field masked, at any depth."""
    if isinstance(value, dict):
        return {
            k: mask_value(k, v) if _is_secret_field(k) else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str) and value[:1] in ("[", "{"):
        # Form-encoded callbacks carry lists such as card_list as JSON text.
        try:
            decoded = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        masked = mask_secrets(decoded)
        if masked != decoded:
            return orjson.dumps(masked).decode()
    return value


def _is_secret_field(name: str) -> bool:
    # Form keys in PHP style name nested fields as `card_list[0][card_no]`.
    leaf = name.rsplit("[", 1)[-1].rstrip("]")
    return leaf in SECRET_FIELDS
