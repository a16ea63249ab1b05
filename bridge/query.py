"""The signed order-detail query over HTTP: the one place network errors are translated."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence

import httpx

from bridge import providers, tracing
from bridge.accounts import Account
from bridge.errors import InvalidAnswer, OrderNotFound, ProviderError, ProviderUnavailable
from bridge.orders import OrderSnapshot
from bridge.providers.base import ProviderResponse
from bridge.providers.client import AnswerTooLarge, ProviderClient

# The worker's own client, or httpx's (the CLI's, which traces nothing).
Http = httpx.AsyncClient | ProviderClient

# An order-detail answer larger than this is refused: 20 orders with their cards fit
# in a small fraction of it.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# The shortest start of a secret that is masked where a provider message was cut short.
_MIN_SECRET_TAIL = 4


async def query_orders(
    http: Http, account: Account, order_ids: Sequence[str]
) -> list[OrderSnapshot]:
    """The orders the provider confirms, of `order_ids` (at most the provider's `max_batch`)."""
    try:
        return await _query_orders(http, account, order_ids)
    except ProviderError as exc:
        scrubbed = _scrubbed(exc, account)
        if scrubbed is exc:
            raise
        raise scrubbed from None


def _scrubbed(error: ProviderError, account: Account) -> ProviderError:
    """`error` without the account's secrets: a provider may echo what it was sent (lemft's
    key travels in the body), and its text goes on to logs and dead letters."""
    problem = error.problem
    for secret in account.secrets():
        problem = problem.replace(secret, "******")
        # Adapters cut a provider's message to a length, which can leave a secret's start.
        for n in range(len(secret) - 1, _MIN_SECRET_TAIL - 1, -1):
            if problem.endswith(secret[:n]):
                problem = problem[:-n] + "******"
                break
    if problem == error.problem:
        return error
    return type(error)(error.provider, error.account, error.order_ids, problem)


async def _query_orders(
    http: Http, account: Account, order_ids: Sequence[str]
) -> list[OrderSnapshot]:
    provider = providers.get(account.provider)
    request = provider.build_query(account, order_ids)

    def unavailable(problem: str) -> ProviderUnavailable:
        return ProviderUnavailable(account.provider, account.name, list(order_ids), problem)

    try:
        if isinstance(http, ProviderClient):
            send = functools.partial(
                http.post,
                request.url,
                content=request.content,
                timeout=account.query_timeout,
                max_bytes=MAX_ANSWER_BYTES,
            )
            answer = await tracing.post(request.url, request.headers, send)
        else:
            answer = await _post(http, request.url, request.headers, request.content, account)
    except AnswerTooLarge:
        raise InvalidAnswer(
            account.provider, account.name, list(order_ids), f"answer over {MAX_ANSWER_BYTES} bytes"
        ) from None
    except (httpx.TimeoutException, TimeoutError):
        raise unavailable(f"no answer within {account.query_timeout:g}s") from None
    except httpx.HTTPError as exc:
        # The message names the host and the OS error only; credentials travel in bodies.
        raise unavailable(f"unreachable: {type(exc).__name__}: {exc}") from None
    return provider.parse_query(account, order_ids, answer)


async def _post(
    http: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    content: bytes,
    account: Account,
) -> ProviderResponse:
    # httpx's timeout bounds each read; this bounds the whole answer, however it drips.
    async with asyncio.timeout(account.query_timeout):
        async with http.stream(
            "POST", url, content=content, headers=headers, timeout=account.query_timeout
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(f"answer over {MAX_ANSWER_BYTES} bytes")
    return ProviderResponse(
        status_code=response.status_code,
        content_type=response.headers.get("content-type", ""),
        content=bytes(body),
    )


async def query_order(http: Http, account: Account, order_id: str) -> OrderSnapshot:
    """One order as the provider confirms it; `OrderNotFound` when it does not know it."""
    for snapshot in await query_orders(http, account, [order_id]):
        return snapshot
    raise OrderNotFound(account.provider, account.name, order_id, "the provider does not know it")
