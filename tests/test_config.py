"""The TOML config: the contract's format, secret references, one-line errors, no leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.accounts import Secret
from bridge.config import Config, load_config, parse_config
from bridge.errors import ConfigError, UnknownAccount

EXAMPLE = """
[kafka]
bootstrap_servers = "broker-1:9092,broker-2:9092"
partitions = 24
enable_idempotence = false
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "bridge"
sasl_password = "env:KAFKA_PASSWORD"

[http]
port = 9000

[[accounts]]
name = "lemft-main"
provider = "lemft"
base_url = "https://api.lemft.example"
customer_id = 10000011
app_id = "env:LEMFT_APP_ID"
key = "env:LEMFT_KEY"

[[accounts]]
name = "lunpay-main"
provider = "lunpay"
base_url = "https://lunpay.example"
merchant_id = "M1"
account_id = "A1"
secret = "file:{secret_file}"
sign_digest = "sha256"
callback_ack = "OK"

[[accounts]]
name = "ksu-main"
provider = "kasushou"
base_url = "https://kasushou.example"
user_id = 10000
api_key = "env:KSU_KEY"
query_timeout = 3
"""

ENV = {
    "KAFKA_PASSWORD": "kafka-pw-s3cret",
    "LEMFT_APP_ID": "100001",
    "LEMFT_KEY": "lemft-key-s3cret",
    "KSU_KEY": "ksu-key-s3cret",
}
SECRETS = ("kafka-pw-s3cret", "lemft-key-s3cret", "ksu-key-s3cret", "lunpay-s3cret")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    secret_file = tmp_path / "lunpay.secret"
    secret_file.write_text("lunpay-s3cret\n")
    path = tmp_path / "bridge.toml"
    path.write_text(EXAMPLE.format(secret_file=secret_file))
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("env")
def test_the_contract_example_loads(config_file: Path) -> None:
    config = load_config(config_file)
    assert config.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert config.kafka.status_topic == "order-status.v1"
    assert config.kafka.state_topic == "order-bridge.state.v1"
    assert config.kafka.partitions == 24
    assert config.kafka.enable_idempotence is False
    assert config.kafka.sasl_password == Secret("kafka-pw-s3cret")
    assert config.http.host == "127.0.0.1"
    assert config.http.port == 9000
    lemft = config.account("lemft", "lemft-main")
    assert lemft.settings.app_id == 100001
    assert lemft.settings.key.reveal() == "lemft-key-s3cret"
    assert lemft.settings.api_version == "v1"
    lunpay = config.account("lunpay", "lunpay-main")
    assert lunpay.settings.secret.reveal() == "lunpay-s3cret"
    assert lunpay.settings.sign_digest == "sha256"
    assert lunpay.callback_ack == "OK"
    ksu = config.account("kasushou", "ksu-main")
    assert ksu.query_timeout == 3.0
    assert ksu.settings.currency == "CNY"


@pytest.mark.usefixtures("env")
def test_no_secret_in_any_repr(config_file: Path) -> None:
    text = repr(load_config(config_file))
    assert "Secret('******')" in text
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.usefixtures("env")
def test_config_path_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDER_BRIDGE_CONFIG", str(config_file))
    assert len(load_config().accounts) == 3


def test_polling_and_worker_sections() -> None:
    config = parse_config(
        {
            "worker": {"group_id": "g", "max_in_flight": 10},
            "polling": {"intervals": [1, 2.5], "max_age": 60, "not_found_retries": 0},
            "accounts": [LEMFT],
        }
    )
    assert config.worker.group_id == "g"
    assert config.polling.intervals == (1.0, 2.5)
    assert [config.polling.interval(n) for n in range(4)] == [1.0, 2.5, 2.5, 2.5]
    assert config.polling.not_found_retries == 0


def test_defaults_with_only_an_account() -> None:
    config = parse_config({"accounts": [LEMFT]})
    assert config == Config(accounts=config.accounts)
    assert config.kafka.enable_idempotence is True
    assert config.kafka.partitions == 12


def test_fetch_max_wait_in_seconds() -> None:
    assert Config().kafka.fetch_max_wait == 0.02
    config = parse_config({"kafka": {"fetch_max_wait": 0.005}, "accounts": [LEMFT]})
    assert config.kafka.fetch_max_wait == 0.005


def test_unknown_account_is_its_own_error() -> None:
    with pytest.raises(UnknownAccount, match="unknown account 'nope' for provider 'lemft'"):
        Config().account("lemft", "nope")


LEMFT = {
    "name": "l",
    "provider": "lemft",
    "base_url": "https://x",
    "customer_id": 1,
    "app_id": 2,
    "key": "k-s3cret",
}


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"kafka": {"bootstrap": "x"}}, "kafka.bootstrap", "unknown key"),
        ({"colour": 1}, "colour", "unknown key"),
        ({"kafka": {"partitions": "many"}}, "kafka.partitions", "expected an integer"),
        ({"kafka": {"enable_idempotence": "yes"}}, "kafka.enable_idempotence", "true or false"),
        ({"kafka": {"security_protocol": "TLS"}}, "kafka.security_protocol", "one of"),
        ({"http": {"port": True}}, "http.port", "expected an integer"),
        ({"http": {"port": -1}}, "http.port", "greater than 0"),
        ({"worker": {"retry_budget": 0}}, "worker.retry_budget", "greater than 0"),
        ({"kafka": {"fetch_max_wait": 0}}, "kafka.fetch_max_wait", "greater than 0"),
        ({"polling": {"intervals": [10, 0]}}, "polling.intervals[1]", "greater than 0"),
        ({"polling": {"intervals": []}}, "polling.intervals", "non-empty list"),
        ({"accounts": [{**LEMFT, "query_rate": 0}]}, "accounts[0].query_rate", "greater than 0"),
        ({"accounts": [{**LEMFT, "max_batch": 0}]}, "accounts[0].max_batch", "greater than 0"),
        ({"accounts": {"name": "x"}}, "accounts", "array of tables"),
        ({"accounts": [{**LEMFT, "provider": "acme"}]}, "accounts[0].provider", "one of"),
        ({"accounts": [{**LEMFT, "secrett": "x"}]}, "accounts[0].secrett", "unknown key"),
        ({"accounts": [{**LEMFT, "key": None}]}, "accounts[0].key", "expected"),
        (
            {"accounts": [{k: v for k, v in LEMFT.items() if k != "key"}]},
            "accounts[0].key",
            "missing",
        ),
        ({"accounts": [{**LEMFT, "name": "Main Acct"}]}, "accounts[0].name", "a-z"),
        ({"accounts": [{**LEMFT, "base_url": "ftp://x"}]}, "accounts[0].base_url", "http"),
        ({"accounts": [LEMFT, LEMFT]}, "accounts[1].name", "used twice"),
        ({"accounts": [{**LEMFT, "key": "env:NOT_SET_ANYWHERE"}]}, "accounts[0].key", "NOT_SET"),
        ({"accounts": [{**LEMFT, "key": "file:/no/such/file"}]}, "accounts[0].key", "cannot read"),
        ({"accounts": [{**LEMFT, "key": 12345}]}, "accounts[0].key", "a string (secret)"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert caught.value.key == key
    assert problem in caught.value.problem
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"config: {key}: ")
    assert "k-s3cret" not in message
    assert "12345" not in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_no_config_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDER_BRIDGE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="ORDER_BRIDGE_CONFIG"):
        load_config(None)


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        (
            {"accounts": [{**LEMFT, "app_id": "env:LEMFT_KEY"}]},
            {"LEMFT_KEY": "k-s3cret"},
            "config: accounts[0].app_id: expected an integer, "
            "got the value of env:LEMFT_KEY (not shown)",
        ),
        (
            {"kafka": {"sasl_mechanism": "env:MECH"}, "accounts": [LEMFT]},
            {"MECH": "k-s3cret"},
            "config: kafka.sasl_mechanism: expected one of 'PLAIN', 'SCRAM-SHA-256', "
            "'SCRAM-SHA-512', got the value of env:MECH (not shown)",
        ),
        (
            {"accounts": [{**LEMFT, "customer_id": "env:CUSTOMER"}]},
            {"CUSTOMER": "0"},
            "config: accounts[0].customer_id: must be greater than 0, "
            "got the value of env:CUSTOMER (not shown)",
        ),
        (
            {"accounts": [{**LEMFT, "key": "env:LEMFT_KEY"}]},
            {"LEMFT_KEY": ""},
            "config: accounts[0].key: environment variable LEMFT_KEY is empty",
        ),
        (
            {"accounts": [{**LEMFT, "key": ""}]},
            {},
            "config: accounts[0].key: is empty: a secret is needed",
        ),
        (
            {"http": {"port": "18181"}, "accounts": [LEMFT]},
            {},
            "config: http.port: expected an integer, got '18181'",
        ),
        (
            {"kafka": {"partitions": 24}},
            {},
            "config: accounts: none configured: add an [[accounts]] table for each account",
        ),
    ],
)
def test_config_messages(data: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=env)
    assert str(caught.value) == message


def test_file_reference_is_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("k-s3cret\n")
    with pytest.raises(ConfigError) as caught:
        parse_config({"accounts": [{**LEMFT, "app_id": f"file:{secret}"}]}, env={})
    assert str(caught.value) == (
        f"config: accounts[0].app_id: expected an integer, got the value of file:{secret} "
        "(not shown)"
    )
    secret.write_text("\n")
    with pytest.raises(ConfigError) as caught:
        parse_config({"accounts": [{**LEMFT, "key": f"file:{secret}"}]}, env={})
    assert str(caught.value) == f"config: accounts[0].key: {secret} is empty"


def test_numbers_as_text_only_from_references(tmp_path: Path) -> None:
    app_id = tmp_path / "app_id"
    app_id.write_text("100001\n")
    account = {**LEMFT, "customer_id": "env:CUSTOMER", "app_id": f"file:{app_id}"}
    config = parse_config({"accounts": [account]}, env={"CUSTOMER": "10000011"})
    settings = config.accounts[0].settings
    assert (settings.customer_id, settings.app_id) == (10000011, 100001)
    with pytest.raises(ConfigError) as caught:
        parse_config({"accounts": [{**LEMFT, "customer_id": "10000011"}]}, env={})
    assert (
        str(caught.value) == "config: accounts[0].customer_id: expected an integer, got '10000011'"
    )


INSECURE = (
    "http:// to a host that is not loopback sends the credentials unencrypted and trusts "
    "unsigned answers: use https://, or set allow_insecure_http = true in this account"
)


def test_plain_http_only_to_loopback_unless_allowed() -> None:
    for url in ("http://api.lemft.example", "http://10.0.0.5:8080", "http://127.0.0.1.nip.io"):
        with pytest.raises(ConfigError) as caught:
            parse_config({"accounts": [{**LEMFT, "base_url": url}]}, env={})
        assert str(caught.value) == f"config: accounts[0].base_url: {INSECURE}"
    accepted = [
        {**LEMFT, "base_url": url}
        for url in (
            "http://127.0.0.1:8080/lemft",
            "http://127.8.9.10",
            "http://[::1]:8080",
            "http://localhost:8080",
            "http://LocalHost",
            "https://api.lemft.example",
        )
    ]
    accepted.append({**LEMFT, "base_url": "http://api.lemft.example", "allow_insecure_http": True})
    for account in accepted:
        assert parse_config({"accounts": [account]}, env={}).accounts[0].base_url
