"""The one exception hierarchy of order-bridge.

    BridgeError
    ├── ConfigError                 bad or missing setting: names the key, never the value
    ├── StartupError                Kafka unreachable, topics that do not match, no broker binary
    ├── UnknownAccount              no such provider/account pair (HTTP 404)
    ├── CallbackRejected            a callback body that can never be accepted
    │   ├── MalformedCallback       400: unparseable, or names no order
    │   ├── BadSignature            401: kasushou signature does not match
    │   ├── CallbackTooLarge        413: body over the limit
    │   └── UnsupportedMediaType    415: neither JSON nor form-encoded
    └── ProviderError               the order-detail query failed
        ├── TransientProviderError  retry with backoff
        │   ├── ProviderUnavailable     connect error, timeout, 5xx, 429
        │   ├── InvalidAnswer           not the API's shape: HTML from a proxy, garbage
        │   └── MismatchedAnswer        the answer is about another order
        └── PermanentProviderError  retrying the same request cannot help: dead-letter
            ├── CredentialsRejected     the provider refused our credentials or signature
            ├── ProviderRejected        an error envelope (lemft non-zero code, lunpay 403,
            │                           kasushou 400)
            └── OrderNotFound           the provider does not know the order

Every error carries what an operator needs to act (provider, account, order id)
and never a secret: messages are built from names and provider messages only,
and `bridge.query` masks the account's secrets in what a provider echoes back.
A retry loop asks `error.transient` rather than matching on types.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error order-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration cannot be used; `key` names the setting at fault."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config: {key}: {problem}")


class StartupError(BridgeError):
    """The bridge cannot start or keep running: the message says what to fix."""


class UnknownAccount(BridgeError):
    def __init__(self, provider: str, account: str) -> None:
        self.provider = provider
        self.account = account
        super().__init__(f"unknown account {account!r} for provider {provider!r}")


class CallbackRejected(BridgeError):
    """A callback that no retry will make acceptable; `status_code` is our HTTP answer."""

    status_code = 400

    def __init__(
        self, provider: str, account: str, reason: str, order_id: str | None = None
    ) -> None:
        self.provider = provider
        self.account = account
        self.reason = reason
        # The order the callback named, when it could be read.
        self.order_id = order_id
        super().__init__(f"{provider}/{account}: callback rejected: {reason}")


class MalformedCallback(CallbackRejected):
    status_code = 400


class BadSignature(CallbackRejected):
    status_code = 401


class CallbackTooLarge(CallbackRejected):
    status_code = 413


class UnsupportedMediaType(CallbackRejected):
    status_code = 415


class ProviderError(BridgeError):
    """An order-detail query that did not give a usable answer."""

    transient: bool = False

    def __init__(
        self, provider: str, account: str, order_ids: str | list[str], problem: str
    ) -> None:
        self.provider = provider
        self.account = account
        self.order_ids = [order_ids] if isinstance(order_ids, str) else list(order_ids)
        self.problem = problem
        super().__init__(f"{provider}/{account} order {','.join(self.order_ids)}: {problem}")


class TransientProviderError(ProviderError):
    transient = True


class ProviderUnavailable(TransientProviderError):
    """Unreachable, timed out or overloaded."""


class InvalidAnswer(TransientProviderError):
    """An answer that is not the API's shape, such as a proxy's HTML error page."""


class MismatchedAnswer(TransientProviderError):
    """The answer names another order: a provider or proxy mix-up, worth asking again."""


class PermanentProviderError(ProviderError):
    transient = False


class CredentialsRejected(PermanentProviderError):
    """The provider refused the account's credentials or our signature."""


class ProviderRejected(PermanentProviderError):
    """The provider answered with an error envelope."""


class OrderNotFound(PermanentProviderError):
    """The provider does not know the order (it may yet appear: creation can lag)."""
