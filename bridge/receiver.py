"""The receiver: the HTTP side of the bridge.

A callback is answered 200 only once its hint is acked in the inbox topic; when
Kafka can't take it the answer is 503 with Retry-After, so the provider retries.
Bodies that can never be accepted are answered 4xx and kept, masked, in the
dead-letter topic. Logs name providers, accounts and orders, never a body or a
header value; whatever came from the client goes through `redact.shown` first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bridge import openapi, providers, redact, tracing
from bridge.accounts import Account
from bridge.clock import now_iso
from bridge.config import Config
from bridge.deadletter import Reason, dead_letter
from bridge.errors import (
    BadSignature,
    CallbackRejected,
    CallbackTooLarge,
    MalformedCallback,
    UnknownAccount,
    UnsupportedMediaType,
)
from bridge.inbox import KEPT_HEADERS, InboxRecord
from bridge.kafka import Producer
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.providers.base import Provider, callback_ack
from bridge.redact import shown
from bridge.servers import body_arrived

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    # What keeps the bridge from doing its job: /readyz answers 503.
    problems: list[str]
    # What slows it down without failing anything (an open circuit breaker): still 200.
    degraded: list[str]


Ready = Callable[[], Awaitable[Readiness]]

# An answer to a callback: status, plain text, headers before content-length and -type.
_Answer = tuple[int, str, Mapping[str, str] | None]

METRICS_TYPE = CONTENT_TYPE
BODY_LATE = "request body not received in time\n"
_CLOSE = {"connection": "close"}
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
MAX_ORDER_ID = 128
UNAVAILABLE = "inbox unavailable, retry later"

_REASONS: dict[type[CallbackRejected], Reason] = {
    MalformedCallback: "malformed",
    BadSignature: "bad_signature",
    CallbackTooLarge: "too_large",
    UnsupportedMediaType: "unsupported_media_type",
}


def create_app(config: Config, producer: Producer, metrics: Metrics, ready: Ready) -> Starlette:
    receiver = Receiver(config, producer, metrics, ready)
    callbacks = Route("/callbacks/{provider}/{account}", _CallbackRoute(receiver), methods=["POST"])
    return _ReceiverApp(
        receiver,
        callbacks.path_regex,
        routes=[
            callbacks,
            Route("/orders/watch", receiver.watch, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", receiver.readyz, methods=["GET"]),
            Route("/metrics", receiver.metrics_text, methods=["GET"]),
            Route("/openapi.json", openapi.serve, methods=["GET"]),
        ],
        exception_handlers={BodyTimeout: body_timed_out, ClientDisconnect: client_went_away},
    )


class _ReceiverApp(Starlette):
    """Starlette, with callbacks taken straight to `Receiver.callback`.

    Starlette's middleware, router, Request and Response took a sixth of a callback's
    CPU. A callback skips them while the app has no middleware of its own (tracing adds
    one, which must see every request); everything else, and a callback when it does
    not, goes through Starlette, whose route for callbacks answers the same
    (tests/test_receiver.py compares the two).
    """

    def __init__(self, receiver: Receiver, callbacks: re.Pattern[str], **options: Any) -> None:
        super().__init__(**options)
        self._receiver = receiver
        # The callback route's own pattern.
        self._callbacks = callbacks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not self.user_middleware:
            # On the path as Starlette's router reads it when there is no root_path.
            match = None if scope.get("root_path") else self._callbacks.match(scope["path"])
            if match is not None:
                provider, account = match.group("provider", "account")
                await self._receiver.callback(scope, receive, send, provider, account)
                return
        await super().__call__(scope, receive, send)


class _CallbackRoute:
    """The callback route's ASGI endpoint, as Starlette calls it."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._receiver.callback(scope, receive, send, params["provider"], params["account"])


class BodyTimeout(Exception):
    """The client did not send the whole request body in time."""


async def body_timed_out(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: body not received in time: 408", request.method, _shown(request.scope))
    # What is left of the body is not read: the connection closes instead.
    return PlainTextResponse(BODY_LATE, 408, _CLOSE)


async def client_went_away(request: Request, exc: Exception) -> Response:
    log.warning(
        "%s %s: the client left before its body ended", request.method, _shown(request.scope)
    )
    return Response(status_code=400)  # nobody is left to read it


async def _send_text(
    send: Send, status: int, text: str, headers: Mapping[str, str] | None = None
) -> None:
    """Answers as Starlette's `PlainTextResponse(text, status, headers)` does, header for
    header: `headers` first, then content-length and content-type."""
    body = text.encode()
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    raw.append(_TEXT_PLAIN)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Receiver:
    def __init__(self, config: Config, producer: Producer, metrics: Metrics, ready: Ready) -> None:
        self.config = config
        self.producer = producer
        self.metrics = metrics
        self.ready = ready
        # Looked up for every callback: the registry imports its module each time.
        self._accounts = {
            (account.provider, account.name): (providers.get(account.provider), account)
            for account in config.accounts
        }
        # The series a callback counts on, by provider, account and outcome (bounded sets).
        self._callback_series: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    async def callback(
        self, scope: Scope, receive: Receive, send: Send, provider_name: str, account_name: str
    ) -> None:
        """`POST /callbacks/{provider}/{account}`, as a bare ASGI app."""
        status, text, headers = await self._callback(scope, receive, provider_name, account_name)
        await _send_text(send, status, text, headers)

    async def _callback(
        self, scope: Scope, receive: Receive, provider_name: str, account_name: str
    ) -> _Answer:
        started = time.perf_counter()
        try:
            provider, account = self._find(provider_name, account_name)
        except UnknownAccount:
            known = provider_name in providers.names()
            label = provider_name if known else "unknown"
            self._count_callback(label, "unknown", "unknown_account", started)
            log.warning("callback refused: unknown provider or account in %s", _shown(scope))
            return 404, f"unknown {'account' if known else 'provider'}\n", None

        headers = _headers(scope["headers"])
        try:
            body = await self._read_body(receive, headers)
        except BodyTimeout:
            log.warning("%s %s: body not received in time: 408", scope["method"], _shown(scope))
            return 408, BODY_LATE, _CLOSE
        except ClientDisconnect:
            log.warning(
                "%s %s: the client left before its body ended", scope["method"], _shown(scope)
            )
            return 400, "", None  # nobody is left to read it
        try:
            if body is None:
                limit = self.config.http.max_body_bytes
                raise CallbackTooLarge(provider.name, account.name, _too_large(headers, limit))
            hint = provider.parse_callback(account, body, headers)
            problem = order_id_problem(hint.order_id)
            if problem:
                raise MalformedCallback(provider.name, account.name, problem)
        except CallbackRejected as exc:
            return await self._reject(exc, body, started)

        record = InboxRecord(
            provider=provider.name,
            account=account.name,
            order_id=hint.order_id,
            trigger="callback",
            received_at=now_iso(),
            content_type=hint.content_type,
            body=hint.stored_body.decode("utf-8", "replace"),
            headers=_kept_headers(scope, headers),
            claimed_status=hint.claimed_status,
            signature_rule=hint.signature_rule,
            traceparent=tracing.for_callback(headers.get(tracing.HEADER)),
        )
        if not await self._store(record):
            self._count_callback(provider.name, account.name, "unavailable", started)
            return 503, UNAVAILABLE + "\n", self._retry_later()
        self._count_callback(provider.name, account.name, "accepted", started)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "callback accepted: %s/%s order %s (signature: %s)",
                provider.name,
                account.name,
                shown(hint.order_id),
                hint.signature_rule or "none",
            )
        return 200, callback_ack(account, provider), None

    async def watch(self, request: Request) -> Response:
        headers = _headers(request.scope["headers"])
        body = await self._read_body(request.receive, headers)
        if body is None:
            return self._watch_refused(413, "body too large", close=True)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._watch_refused(400, "body is not valid JSON")
        problem = _watch_problem(data)
        if problem:
            return self._watch_refused(400, problem)
        try:
            provider, account = self._find(data["provider"], data["account"])
        except UnknownAccount:
            self.metrics.inc("order_bridge_watch_requests_total", outcome="unknown_account")
            log.warning("watch request refused: unknown provider or account")
            return JSONResponse({"error": "unknown provider or account"}, 404)

        record = InboxRecord(
            provider=provider.name,
            account=account.name,
            order_id=data["order_id"].strip(),
            trigger="watch",
            received_at=now_iso(),
            headers=_kept_headers(request.scope, headers),
            traceparent=tracing.for_callback(headers.get(tracing.HEADER)),
        )
        if not await self._store(record):
            self.metrics.inc("order_bridge_watch_requests_total", outcome="unavailable")
            return JSONResponse({"error": UNAVAILABLE}, 503, self._retry_later())
        self.metrics.inc("order_bridge_watch_requests_total", outcome="accepted")
        log.info(
            "watch accepted: %s/%s order %s", provider.name, account.name, shown(record.order_id)
        )
        return JSONResponse({"status": "accepted", "key": record.key}, 202)

    async def readyz(self, request: Request) -> Response:
        readiness = await self.ready()
        if readiness.problems:
            answer = {"ready": False, "problems": readiness.problems}
            return JSONResponse({**answer, "degraded": readiness.degraded}, 503)
        return JSONResponse({"ready": True, "degraded": readiness.degraded})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_TYPE)

    async def _read_body(self, receive: Receive, headers: Mapping[str, str]) -> bytes | None:
        http = self.config.http
        declared = headers.get("content-length", "")
        return await read_body(receive, declared, http.max_body_bytes, http.body_timeout)

    def _find(self, provider_name: str, account_name: str) -> tuple[Provider, Account]:
        found = self._accounts.get((provider_name, account_name))
        if found is None:
            raise UnknownAccount(provider_name, account_name)
        return found

    async def _store(self, record: InboxRecord) -> bool:
        """Writes `record` to the inbox; whether Kafka acked it within the inbox timeout."""
        started = time.perf_counter()
        try:
            await self.producer.send(
                self.config.kafka.inbox_topic,
                record.key,
                record.encode(),
                timeout=self.config.http.inbox_timeout,
            )
        except TimeoutError:
            outcome, problem = "timeout", f"no ack within {self.config.http.inbox_timeout:g}s"
        except (KafkaError, OSError) as exc:
            outcome, problem = "error", type(exc).__name__
        else:
            outcome = "ok"
        self.metrics.inc("order_bridge_inbox_writes_total", outcome=outcome)
        elapsed = time.perf_counter() - started
        self.metrics.observe("order_bridge_inbox_write_seconds", elapsed, outcome=outcome)
        if outcome == "ok":
            return True
        log.warning("inbox write for %s failed (%s): answering 503", shown(record.key), problem)
        return False

    async def _reject(self, exc: CallbackRejected, body: bytes | None, started: float) -> _Answer:
        reason = _REASONS.get(type(exc), "malformed")
        value, headers = dead_letter(
            reason,
            exc.reason,
            provider=exc.provider,
            account=exc.account,
            order_id=exc.order_id,
            body=_kept_body(reason, body),
        )
        try:
            await self.producer.send(
                self.config.kafka.deadletter_topic,
                f"{exc.provider}/{exc.account}",
                value,
                headers,
                timeout=self.config.http.inbox_timeout,
            )
        except (TimeoutError, KafkaError, OSError) as error:
            # The answer stays 4xx: no retry can make this body acceptable.
            log.warning(
                "dead-letter write for a %s callback of %s/%s failed: %s",
                reason,
                exc.provider,
                exc.account,
                type(error).__name__,
            )
        else:
            self.metrics.inc("order_bridge_deadletters_total", reason=reason)
        self._count_callback(exc.provider, exc.account, f"rejected_{exc.status_code}", started)
        log.warning("callback rejected: %s/%s: %s", exc.provider, exc.account, reason)
        # Unread bytes of a body too large are not drained: the connection closes instead.
        return exc.status_code, f"{reason}: {exc.reason}\n", _CLOSE if body is None else None

    def _watch_refused(self, status: int, problem: str, close: bool = False) -> Response:
        self.metrics.inc("order_bridge_watch_requests_total", outcome=f"rejected_{status}")
        log.warning("watch request refused: %s", problem)
        headers = {"connection": "close"} if close else None
        return JSONResponse({"error": problem}, status, headers)

    def _retry_later(self) -> dict[str, str]:
        return {"retry-after": str(self.config.http.retry_after)}

    def _count_callback(self, provider: str, account: str, outcome: str, started: float) -> None:
        """Counts a callback and how long its answer took (`started`: `time.perf_counter()`)."""
        series = self._callback_series.get((provider, account, outcome))
        if series is None:
            series = self._callback_series[provider, account, outcome] = (
                self.metrics.counter(
                    "order_bridge_callbacks_total",
                    provider=provider,
                    account=account,
                    outcome=outcome,
                ),
                self.metrics.histogram(
                    "order_bridge_callback_seconds", provider=provider, outcome=outcome
                ),
            )
        count, seconds = series
        count.inc()
        seconds.observe(time.perf_counter() - started)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def read_body(receive: Receive, declared: str, limit: int, timeout: float) -> bytes | None:
    """The request body; `None` when it is over `limit` bytes (or `declared`, its
    content-length header, says so), with reading stopped there.

    Raises BodyTimeout when it has not all come within `timeout` seconds, and
    ClientDisconnect when the client goes away first.
    """
    if declared.isdigit() and int(declared) > limit:
        return None
    reading = _receive_body(receive, limit)
    if body_arrived(receive):
        # Nothing to wait for, so no deadline to keep: arming and cancelling a timer
        # for each callback was a twentieth of the receiver's CPU.
        return await reading
    try:
        async with asyncio.timeout(timeout):
            return await reading
    except TimeoutError:
        raise BodyTimeout from None


async def _receive_body(receive: Receive, limit: int) -> bytes | None:
    chunks = []
    size = 0
    more = True
    # The ASGI messages themselves, not request.stream(): an async generator costs more
    # than the rest of this loop.
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _too_large(headers: Mapping[str, str], limit: int) -> str:
    declared = headers.get("content-length", "")
    if declared.isdigit():
        return f"body of {int(declared)} bytes is over the limit of {limit}"
    return f"body is over the limit of {limit} bytes (reading stopped there)"


def order_id_problem(order_id: str) -> str | None:
    """Why `order_id` can't name an order, or `None`: the one rule for callbacks and watches.

    kasushou queries join order ids with commas: one such id would spoil a batch. Ids go
    into Kafka keys and log lines, so nothing invisible (control, format or separator
    characters, such as bidi marks) gets in either.
    """
    if len(order_id) > MAX_ORDER_ID:
        return f"order_id is longer than {MAX_ORDER_ID} characters"
    if "," in order_id or " " in order_id or not order_id.isprintable():
        return "order_id must not hold commas, spaces or control characters"
    return None


def _watch_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "body must be a JSON object"
    for name in ("provider", "account", "order_id"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            return f"{name} must be a non-empty string"
    return order_id_problem(data["order_id"].strip())


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """A request's headers (`scope["headers"]`) by (lower-case) name; of a repeated one
    the first, as Starlette's `request.headers[name]` gives it. In one pass:
    `dict(request.headers)` looks through them all again for each name."""
    found: dict[str, str] = {}
    for name, value in raw:
        found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def _kept_headers(scope: Scope, headers: Mapping[str, str]) -> dict[str, str]:
    kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
    client = scope.get("client")
    if client is not None:
        kept["remote_addr"] = client[0]
    return kept


def _shown(scope: Scope) -> str:
    """The request's path made fit for a log line."""
    # Not request.url.path: parsing the URL drops some characters (tabs, line breaks).
    return shown(scope["path"])


def _kept_body(reason: str, body: bytes | None) -> str | None:
    """What a refused body leaves in its dead letter: masked JSON or form text.

    Not a body too large (the detail gives its size), nor one of another media type:
    masking only knows JSON and form encoding, and multipart or XML would keep
    card secrets in plain text.
    """
    if body is None or reason == "unsupported_media_type":
        return None
    return redact.mask_text(body.decode("utf-8", "replace"))
