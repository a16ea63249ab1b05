"""Masking of card data and credentials in payloads and text."""

from __future__ import annotations

import itertools
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson

MASK = "******"

# Field names that hold card secrets, and those that hold credentials, wherever they
# appear in a payload. Card secrets may be sealed for consumers (bridge.sealing);
# credentials are always masked.
CARD_FIELDS = frozenset({"card_no", "card_number", "card_password", "cvv", "cvc", "pin"})
SECRET_FIELDS = CARD_FIELDS | {"key", "secret", "api_key"}
# Payloads are flat or nearly so: deeper nesting is refused, or masked as text.
MAX_NESTING = 32
# Card numbers keep their last four digits so people can still tell cards apart.
_KEEP_LAST_FOUR = frozenset({"card_no", "card_number"})


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests lists and objects deeper than `limit`, found without
    recursion: the point is to refuse what would exhaust the stack when walked."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
    return False


def mask_value(field: str, value: Any) -> Any:
    """The masked form of one secret field's value."""
    if value in (None, ""):
        return value
    text = str(value)
    if field in _KEEP_LAST_FOUR and len(text) > 8:
        return "*" * (len(text) - 4) + text[-4:]
    return MASK


def mask_secrets(value: Any, hide: Callable[[str, Any], Any] = mask_value) -> Any:
    """A decoded JSON payload with every secret field's value replaced by
    `hide(field, value)`, at any depth: masked, unless told otherwise. A copy where
    anything is replaced; `value` itself when nothing is (most callbacks: no copy made)."""
    if isinstance(value, dict):
        hidden: dict[Any, Any] | None = None
        for index, (name, item) in enumerate(value.items()):
            field = _secret_leaf(name)
            new = mask_secrets(item, hide) if field is None else hide(field, item)
            if hidden is not None:
                hidden[name] = new
            elif new is not item:
                # The first change: the members before it are copied as they are.
                hidden = dict(itertools.islice(value.items(), index))
                hidden[name] = new
        return value if hidden is None else hidden
    if isinstance(value, list):
        items = [mask_secrets(item, hide) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, str) and value[:1] in ("[", "{"):
        # Form-encoded callbacks carry lists such as card_list as JSON text.
        try:
            decoded = orjson.loads(value)
        except orjson.JSONDecodeError:
            return mask_text(value)
        if nested_deeper_than(decoded, MAX_NESTING):
            return mask_text(value)
        masked = mask_secrets(decoded, hide)
        if masked != decoded:
            return orjson.dumps(masked).decode()
    return value


# A JSON string, possibly cut off at the end of the text. Possessive, so that a scan over
# a body full of quotes and backslashes stays linear.
_JSON_STRING = r'"(?:[^"\\]|\\.|\\\Z)*+(?:"|\Z)'
# A member `"name": value` whose value is a string or a number, or else any other string:
# matching every string keeps the scan from ever starting inside one.
_JSON_MEMBER = re.compile(
    rf"(?P<name>{_JSON_STRING})(?P<colon>\s*:\s*)(?P<value>{_JSON_STRING}|-?\d[\d.eE+-]*)"
    rf"|{_JSON_STRING}",
    re.DOTALL,
)


def mask_text(text: str) -> str:
    """`text` with the values of secret fields masked, for a body that may not even parse.

    Finds JSON members (`"card_no": "..."`, also numbers and nested JSON text), form
    pairs (`card_no=...`, `card_list[0][card_password]=...`, percent-encoded or not)
    and JSON inside form values. Card numbers keep their last four digits.
    """
    if not _may_name_a_secret(text):
        return text
    return _mask_form(_mask_json(text))


def _may_name_a_secret(text: str) -> bool:
    """Whether `text` may hold a secret field's name, as masking reads names: False only
    when none is there in plain text, nor can be written otherwise.

    Rescanning a body with nothing to mask was a twentieth of a callback's CPU. A name
    other than in plain text needs a JSON escape (a backslash) or a percent-encoding
    (`%`); names are matched in lower case (`_secret_leaf`), so the text is lowered
    the same way. Short names such as `key` or `pin` in longer words only mean a scan.
    """
    if "\\" in text or "%" in text:
        return True
    lowered = text.lower()
    return any(name in lowered for name in SECRET_FIELDS)


def _mask_json(text: str) -> str:
    return _JSON_MEMBER.sub(_masked_member, text)


def _masked_member(match: re.Match[str]) -> str:
    name, value = match["name"], match["value"]
    if name is None:
        return match[0]
    field = _secret_leaf(_json_text(name))
    if field is not None:
        masked = mask_value(field, _json_text(value))
        return f"{name}{match['colon']}{orjson.dumps(masked).decode()}"
    if value.startswith('"') and '\\"' in value:
        # JSON written into a string: `"card_list": "[{\"card_no\": ...}]"`.
        inner = _json_text(value)
        masked = _mask_json(inner)
        if masked != inner:
            return f"{name}{match['colon']}{orjson.dumps(masked).decode()}"
    return match[0]


def _json_text(token: str) -> str:
    """The text of a JSON string or number token; a string cut off is taken as it is."""
    if not token.startswith('"'):
        return token
    try:
        text = orjson.loads(token)
    except orjson.JSONDecodeError:
        return token[1:].removesuffix('"')
    return text if isinstance(text, str) else token


def _mask_form(text: str) -> str:
    pairs = text.split("&")
    for i, pair in enumerate(pairs):
        name, equals, value = pair.partition("=")
        if not equals:
            continue
        decoded = urllib.parse.unquote_plus(value)
        field = _secret_leaf(urllib.parse.unquote_plus(name))
        if field is not None:
            masked = mask_value(field, decoded)
        elif decoded != value:
            # Percent-encoded JSON, such as kasushou's card_list in a form callback.
            masked = _mask_json(decoded)
        else:
            continue  # raw JSON in the text has been masked already
        if masked != decoded:
            pairs[i] = f"{name}={urllib.parse.quote_plus(masked, safe='*')}"
    return "&".join(pairs)


def _secret_leaf(name: str) -> str | None:
    """The secret field `name` stands for, in lower case; `None` when it is not one."""
    found = _LEAVES.get(name, "")  # never a value kept: not met yet
    if found == "":
        leaf = name.rsplit("[", 1)[-1].rstrip("]").strip().lower()
        found = leaf if leaf in SECRET_FIELDS else None
        if len(_LEAVES) < _MAX_LEAVES:
            _LEAVES[name] = found
    return found


# What the field names met so far stand for: each callback names them again. Names
# come from clients, so only the first _MAX_LEAVES are kept.
_LEAVES: dict[str, str | None] = {}
_MAX_LEAVES = 4096


def shown(text: str, limit: int = 128) -> str:
    """`text` from outside made safe for one log line: cut to `limit` characters, and
    every character that is not printable escaped as Python writes it (`\\n`, `\\x1b`,
    `\\u202e`, ...), so that no input can end a line, colour a terminal or turn text
    around. Backslashes are doubled, so an escape in the line always means one here."""
    cut = text[:limit]
    if not cut.isprintable() or "\\" in cut:
        cut = "".join(
            c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode() for c in cut
        )
    return cut + ("..." if len(text) > limit else "")
