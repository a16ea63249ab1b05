"""The protocol every provider module satisfies, and the helpers they share.

A provider module is sans-I/O: it builds the signed query as bytes and parses
bytes back. `bridge.query` does the HTTP, so one place translates network
errors and every provider is tested without a network.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bridge.errors import (
    CredentialsRejected,
    InvalidAnswer,
    MalformedCallback,
    ProviderRejected,
    ProviderUnavailable,
    UnsupportedMediaType,
)
from bridge.orders import CallbackHint, OrderSnapshot, ProviderStatus, Status
from bridge.redact import MAX_NESTING, mask_secrets, mask_text

if TYPE_CHECKING:
    from bridge.accounts import Account


@dataclass(frozen=True)
class ProviderRequest:
    url: str
    headers: Mapping[str, str]
    # Not in the repr: lemft's body carries its key.
    content: bytes = field(repr=False)


@dataclass(frozen=True)
class ProviderResponse:
    status_code: int
    content_type: str
    content: bytes


class Provider(Protocol):
    name: str
    # The dataclass of an account's credentials and options at this provider.
    settings_type: type[Any]
    # The most order ids one query may name.
    max_batch: int
    # The plain-text body a callback is answered with, unless the account sets callback_ack.
    default_callback_ack: str

    def build_query(self, account: Account, order_ids: Sequence[str]) -> ProviderRequest:
        """The signed order-detail query for `order_ids` (at most `max_batch`)."""

    def parse_query(
        self, account: Account, order_ids: Sequence[str], response: ProviderResponse
    ) -> list[OrderSnapshot]:
        """The orders found in an answer; raises a `ProviderError` for an error answer."""

    def parse_callback(
        self, account: Account, body: bytes, headers: Mapping[str, str]
    ) -> CallbackHint:
        """The order a callback names; raises `CallbackRejected` when it can't be accepted."""


StatusTable = Mapping[int, tuple[Status, str]]


def map_status(table: StatusTable, raw: Any) -> tuple[Status, ProviderStatus]:
    """The normalized status of a provider code; an unmapped code gives `unknown`, kept raw."""
    code: int | str = raw if isinstance(raw, int | str) and not isinstance(raw, bool) else str(raw)
    if isinstance(code, str) and code.lstrip("-").isdigit():
        code = int(code)
    if isinstance(code, int) and code in table:
        status, label = table[code]
        return status, ProviderStatus(code, label)
    return Status.UNKNOWN, ProviderStatus(code, "unknown")


def callback_ack(account: Account, provider: Provider) -> str:
    """The plain-text body that tells the provider its callback was received."""
    if account.callback_ack is not None:
        return account.callback_ack
    return provider.default_callback_ack


class AnswerReader:
    """Reads one query answer, raising errors that name the account and the orders."""

    def __init__(self, account: Account, order_ids: Sequence[str]) -> None:
        self.provider = account.provider
        self.account = account.name
        self.order_ids = list(order_ids)

    def json(self, response: ProviderResponse) -> dict[str, Any]:
        """The answer's JSON object, with numbers kept exact as `Decimal`."""
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise self.error(ProviderUnavailable, f"HTTP {status}")
        try:
            data = json.loads(response.content, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            return data
        if status in (401, 403):
            raise self.error(CredentialsRejected, f"HTTP {status}")
        if status >= 400:
            raise self.error(ProviderRejected, f"HTTP {status}: check base_url")
        kind = response.content_type.split(";")[0].strip() or "no content type"
        raise self.error(InvalidAnswer, f"HTTP {status} answer is not a JSON object ({kind})")

    def decimal(self, value: Any, name: str) -> Decimal | None:
        """An amount as `Decimal`: from JSON text or a decimal string; empty gives `None`."""
        if value is None or value == "":
            return None
        if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
            raise self.error(InvalidAnswer, f"{name} is not an amount")
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise self.error(InvalidAnswer, f"{name} is not an amount") from None
        if not amount.is_finite():
            raise self.error(InvalidAnswer, f"{name} is not an amount")
        return amount

    def error(self, kind: type[Exception], problem: str) -> Exception:
        return kind(self.provider, self.account, self.order_ids, problem)


def jsonable(value: Any) -> Any:
    """`value` with every Decimal turned into its exact string, ready for JSON."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


CallbackEncoding = Literal["json", "form"]


@dataclass(frozen=True)
class DecodedCallback:
    fields: dict[str, Any]
    encoding: CallbackEncoding
    content_type: str
    raw: bytes = field(repr=False)

    def stored_body(self) -> bytes:
        """The body with card secrets masked; the raw bytes when there is nothing to mask."""
        masked = mask_secrets(self.fields)
        if masked == self.fields:
            # `fields` keeps a repeated key's last value only (`cvv=123&cvv=`): mask the
            # text too before keeping the raw bytes.
            text = self.raw.decode("utf-8", "replace")
            masked_text = mask_text(text)
            return self.raw if masked_text == text else masked_text.encode()
        if self.encoding == "json":
            # json, as it was read: orjson can't write integers past 64 bits.
            return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode()
        return urllib.parse.urlencode(masked).encode()


def decode_callback(account: Account, body: bytes, headers: Mapping[str, str]) -> DecodedCallback:
    """A callback body as a dict of fields, whether it came as JSON or form-encoded."""
    content_type = headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()

    def rejected(kind: type[Exception], reason: str) -> Exception:
        return kind(account.provider, account.name, reason)

    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            # Strict UTF-8 first: json.loads would take bytes of a lone surrogate as one.
            text = body.decode("utf-8")
            fields = json.loads(text)
        except (ValueError, RecursionError):
            raise rejected(MalformedCallback, "body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise rejected(MalformedCallback, "JSON body is not an object")
        problem = None if _plainly_fit(text) else _json_problem(fields)
        if problem:
            raise rejected(MalformedCallback, f"JSON body {problem}")
        return DecodedCallback(fields, "json", content_type, body)
    if media_type == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            # parse_qsl decodes percent-escapes with errors="replace": never a lone surrogate.
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            raise rejected(MalformedCallback, "body is not valid form encoding") from None
        return DecodedCallback(dict(pairs), "form", content_type, body)
    raise rejected(UnsupportedMediaType, f"content type {media_type or '(none)'!r}")


def _plainly_fit(text: str) -> bool:
    """Whether JSON `text` (strict UTF-8) can hold neither a lone surrogate nor nesting
    deeper than MAX_NESTING, as its characters alone show: then `_json_problem` need not
    walk it (a twentieth of a callback's CPU). A lone surrogate can only come from a
    `\\u` escape, and each level of nesting opens with `{` or `[`."""
    return "\\u" not in text and text.count("{") + text.count("[") <= MAX_NESTING


def _json_problem(value: Any) -> str | None:
    """What makes decoded JSON unfit for the rest of the bridge, or `None`.

    Every string in a callback must be Unicode text: a `"\\ud800"` escape decodes to a
    lone surrogate, which can be neither hashed, compared nor written out as UTF-8.
    Nesting is bounded so that walking the payload can never exhaust the stack.
    Found without recursion, for the same reason.
    """
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            return f"is nested deeper than {MAX_NESTING}"
        if isinstance(item, dict):
            pending.extend((k, depth) for k in item)
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return "holds a lone surrogate: not Unicode text"
    return None


def hint(
    callback: DecodedCallback, order_id: str, signature_rule: str | None = None
) -> CallbackHint:
    """The hint a decoded callback gives: the order it names and its masked copy."""
    status = callback.fields.get("status")
    return CallbackHint(
        order_id=order_id,
        claimed_status=None if status is None else str(status),
        stored_body=callback.stored_body(),
        content_type=callback.content_type,
        signature_rule=signature_rule,
    )


def require_text(account: Account, fields: Mapping[str, Any], *names: str) -> str:
    """The first of `names` present in a callback as non-empty text (or a number)."""
    for name in names:
        value = fields.get(name)
        if isinstance(value, int | str) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    raise MalformedCallback(account.provider, account.name, f"no {' or '.join(names)} field")
