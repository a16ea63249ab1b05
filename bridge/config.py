"""The TOML configuration: loading, secret references, validation.

Every section is a frozen dataclass; `build()` turns a TOML table into one, so
adding a setting is adding a field. Any string value may be `env:NAME` or
`file:PATH`. Problems raise `ConfigError` naming the key; values of `Secret`
fields, and any value read through a reference, never appear in messages or reprs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from bridge import providers
from bridge.accounts import Account, Secret
from bridge.errors import ConfigError, UnknownAccount
from bridge.sealing import card_cipher

CONFIG_ENV = "ORDER_BRIDGE_CONFIG"
# Numeric settings must be above zero, but for these, where 0 means something.
_ZERO_ALLOWED = frozenset({"port", "http_port", "not_found_retries"})
ACCOUNT_NAME = re.compile(r"[a-z0-9-]+")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    status_topic: str = "order-status.v1"
    inbox_topic: str = "order-bridge.inbox.v1"
    deadletter_topic: str = "order-bridge.deadletter.v1"
    state_topic: str = "order-bridge.state.v1"
    partitions: int = 12
    # Used with `partitions` when the bridge creates topics: 1 for a single-broker cluster.
    replication_factor: int = 3
    # `min.insync.replicas` of topics the bridge creates; by default 2 when
    # replication_factor >= 3, else 1. With acks=all, a write is acked by this many.
    min_insync_replicas: int | None = None
    enable_idempotence: bool = True
    # Seconds the broker may hold a worker's inbox fetch that found nothing new. Apache
    # Kafka answers as soon as a record comes; some brokers (Tansu, the embedded one)
    # hold the fetch this long anyway, so each hint can wait this much more there.
    fetch_max_wait: float = 0.02
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Larger callback bodies get 413; enforced while reading.
    max_body_bytes: int = 65536
    # Seconds to wait for Kafka to ack an inbox write before answering 503.
    inbox_timeout: float = 5.0
    # The Retry-After of a 503, in seconds.
    retry_after: int = 5
    # Slow clients are cut off: seconds to send the request's headers, to send its
    # body, and an idle keep-alive connection's life.
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 5.0


@dataclass(frozen=True)
class WorkerSettings:
    # The Kafka consumer group of the workers, on the inbox topic.
    group_id: str = "order-bridge"
    # Hints taken from the inbox and not yet finished; past this the worker stops fetching.
    max_in_flight: int = 1000
    # Seconds a hint may spend on transient errors before it is dead-lettered.
    retry_budget: float = 900.0
    # Backoff between attempts: doubles from `retry_initial` up to `retry_max` seconds, jittered.
    retry_initial: float = 1.0
    retry_max: float = 60.0
    # Seconds between offset commits.
    commit_interval: float = 1.0
    # Consumer group liveness, in seconds.
    session_timeout: float = 10.0
    heartbeat_interval: float = 3.0
    # On SIGTERM or a rebalance: seconds in-flight hints get to finish before they are
    # handed back (another worker, or this one after restart, does them again).
    drain_timeout: float = 10.0
    # Circuit breaker per account: after this many failed queries in a row, queries to
    # the account stop for `breaker_cooldown` seconds, then one is tried.
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    # Hints per account and minute whose callback carried no verified signature that
    # get a query of their own; past it they wait for the order's poll (flood guard).
    unverified_hints_per_minute: int = 600
    # Seconds a partition's hints may wait for its state before /readyz reports it stalled.
    stall_after: float = 60.0
    # A worker-only process (`order-bridge worker`) serves /healthz, /readyz and
    # /metrics on this port of `[http] host`; 0 picks a free one.
    http_port: int = 8081


@dataclass(frozen=True)
class LogSettings:
    # text: one readable line a record; json: one object a line, for log collectors.
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class TracingSettings:
    # none: the bridge passes a callback's traceparent on to its query and its event,
    # and traces nothing itself. otlp: OpenTelemetry traces it (the `otel` extra), and
    # sends the spans where the standard OTEL_EXPORTER_OTLP_* variables say.
    exporter: Literal["none", "otlp"] = "none"


@dataclass(frozen=True)
class PollSettings:
    # Seconds before an unfinished order is asked again: after n answers in a row that
    # changed nothing it waits intervals[n]; the last one repeats.
    intervals: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
    # Seconds after which an order still not final is no longer polled: a `stale`
    # record goes to the dead-letter topic.
    max_age: float = 72 * 3600.0
    # A watched order the provider does not know yet (creation can lag) is asked
    # again this many times before it is dead-lettered as not found.
    not_found_retries: int = 5
    # Seconds after an order stops being followed (final, or given up) that the bridge
    # forgets it, so a worker's memory holds recent orders only. A callback for an
    # order forgotten starts it afresh: its event then has previous_status null.
    forget_after: float = 7 * 86400.0

    def interval(self, step: int) -> float:
        return self.intervals[min(step, len(self.intervals) - 1)]


# The keys an [[accounts]] table may hold besides its provider's own settings.
_ACCOUNT_KEYS = frozenset(f.name for f in dataclasses.fields(Account)) - {"settings"}


@dataclass(frozen=True)
class Config:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    polling: PollSettings = field(default_factory=PollSettings)
    log: LogSettings = field(default_factory=LogSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    accounts: tuple[Account, ...] = ()

    def account(self, provider: str, name: str) -> Account:
        for account in self.accounts:
            if account.name == name and account.provider == provider:
                return account
        raise UnknownAccount(provider, name)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Reads the config file named by `path`, or by the ORDER_BRIDGE_CONFIG variable."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError("--config", f"no config file: pass --config PATH or set {CONFIG_ENV}")
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse_config(data)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    _reject_unknown(data, {"kafka", "http", "worker", "polling", "log", "tracing", "accounts"}, "")
    accounts = data.get("accounts", [])
    if not isinstance(accounts, list):
        raise ConfigError("accounts", "must be an array of tables: [[accounts]]")
    parsed = tuple(_parse_account(table, f"accounts[{i}]", env) for i, table in enumerate(accounts))
    for i, account in enumerate(parsed):
        for j, earlier in enumerate(parsed[:i]):
            if account.name == earlier.name:
                raise ConfigError(f"accounts[{i}].name", f"is used twice (accounts[{j}].name)")
    config = Config(
        kafka=build(KafkaSettings, _table(data, "kafka"), "kafka", env),
        http=build(HttpSettings, _table(data, "http"), "http", env),
        worker=build(WorkerSettings, _table(data, "worker"), "worker", env),
        polling=build(PollSettings, _table(data, "polling"), "polling", env),
        log=build(LogSettings, _table(data, "log"), "log", env),
        tracing=build(TracingSettings, _table(data, "tracing"), "tracing", env),
        accounts=parsed,
    )
    if not parsed:
        raise ConfigError("accounts", "none configured: add an [[accounts]] table for each account")
    return config


def _parse_account(table: Any, path: str, env: Mapping[str, str]) -> Account:
    if not isinstance(table, dict):
        raise ConfigError(path, "must be a table")
    provider_name = table.get("provider")
    if provider_name not in providers.names():
        choices = ", ".join(providers.names())
        raise ConfigError(f"{path}.provider", f"must be one of: {choices}")
    provider = providers.get(provider_name)
    own = {k: v for k, v in table.items() if k in _ACCOUNT_KEYS}
    rest = {k: v for k, v in table.items() if k not in _ACCOUNT_KEYS}
    settings = build(provider.settings_type, rest, path, env)
    account = build(Account, {**own, "settings": settings}, path, env)
    if not ACCOUNT_NAME.fullmatch(account.name):
        raise ConfigError(f"{path}.name", "use only a-z, 0-9 and '-'")
    host = _host(account.base_url)
    if not account.base_url.startswith(("http://", "https://")) or not host:
        raise ConfigError(f"{path}.base_url", "must be a URL starting with http:// or https://")
    insecure = account.base_url.startswith("http://") and not _is_loopback(host)
    if insecure and not account.allow_insecure_http:
        raise ConfigError(
            f"{path}.base_url",
            "http:// to a host that is not loopback sends the credentials unencrypted "
            "and trusts unsigned answers: use https://, or set allow_insecure_http = true "
            "in this account",
        )
    if account.card_key is not None:
        try:
            card_cipher(account.card_key)
        except ValueError as exc:
            hint = "give 32 random bytes in base64 (openssl rand -base64 32)"
            raise ConfigError(f"{path}.card_key", f"{exc}: {hint}") from None
    return account


T = TypeVar("T")


def build(cls: type[T], table: Mapping[str, Any], path: str, env: Mapping[str, str]) -> T:
    """Builds dataclass `cls` from a TOML table: unknown, missing and ill-typed keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    _reject_unknown(table, fields.keys(), path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in table:
            values[name] = _coerce(table[name], hints[name], key, env)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "missing")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, env: Mapping[str, str]) -> Any:
    reference = value if isinstance(value, str) and value.startswith(("env:", "file:")) else None
    if reference is not None:
        value = _resolve_reference(reference, key, env)
    coerced = _coerce_type(value, hint, key, env, reference)
    if isinstance(coerced, int | float) and not isinstance(coerced, bool):
        name = key.rsplit(".", 1)[-1]
        if coerced < 0 or (coerced == 0 and name not in _ZERO_ALLOWED):
            raise ConfigError(key, f"must be greater than 0{_shown(coerced, hint, reference)}")
    return coerced


def _coerce_type(
    value: Any, hint: Any, key: str, env: Mapping[str, str], reference: str | None
) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
            continue
        if option is Secret and isinstance(value, str):
            if not value:
                raise ConfigError(key, "is empty: a secret is needed")
            return Secret(value)
        if option is Any:
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list) and value:
            item = typing.get_args(option)[0]
            return tuple(_coerce(v, item, f"{key}[{i}]", env) for i, v in enumerate(value))
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is int and reference is not None and value.strip().isdigit():
            # What env: and file: give is text, and numeric ids (lemft's app_id) often
            # live there with the secrets: whole numbers are read from it. Written in the
            # file itself, "18181" is a mistake in the type, and is refused.
            return int(value)
        if isinstance(option, type) and isinstance(value, option):
            if isinstance(value, bool) and option is not bool:
                continue
            return value
    raise ConfigError(key, f"expected {_describe(hint)}{_shown(value, hint, reference)}")


def _resolve_reference(value: str, key: str, env: Mapping[str, str]) -> str:
    # An empty value is refused: a variable exported empty, or an empty file, is a
    # secret that failed to arrive, not a setting.
    if value.startswith("env:"):
        name = value[4:]
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        if not env[name]:
            raise ConfigError(key, f"environment variable {name} is empty")
        return env[name]
    file = Path(value[5:])
    try:
        text = file.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {file}: {exc.strerror}") from None
    if not text:
        raise ConfigError(key, f"{file} is empty")
    return text


def _host(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:  # a malformed [IPv6] part
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if hint is Secret:
        return "a string (secret)"
    if typing.get_origin(hint) is tuple:
        return f"a non-empty list, each {_describe(typing.get_args(hint)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _shown(value: Any, hint: Any, reference: str | None) -> str:
    """What a message may say of a value: never a secret, nor what a reference holds."""
    if reference is not None:
        return f", got the value of {reference} (not shown)"
    if Secret in (typing.get_args(hint) if _is_union(hint) else (hint,)):
        return ""
    return f", got {value!r}"


def _reject_unknown(table: Mapping[str, Any], known: typing.Iterable[str], path: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}.{key}" if path else key, "unknown key")


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(name, "must be a table")
    return table
