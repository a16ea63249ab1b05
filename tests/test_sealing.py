"""Card secrets sealed for consumers with an account's `card_key`."""

from __future__ import annotations

import base64
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bridge.accounts import Secret
from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.redact import MASK, mask_secrets
from bridge.sealing import PREFIX, card_cipher, hider, seal, unseal

KEY = Secret(base64.b64encode(os.urandom(32)).decode())
OTHER_KEY = Secret(base64.b64encode(os.urandom(32)).decode())
ACCOUNT = {
    "name": "ksu",
    "provider": "kasushou",
    "base_url": "https://kasushou.example",
    "user_id": 1,
    "api_key": "k",
}


def test_a_sealed_value_opens_with_its_key_and_field_only() -> None:
    sealed = seal(KEY, "card_password", "8841-2203-5517")
    assert sealed.startswith(PREFIX)
    assert "8841" not in sealed
    assert unseal(KEY, "card_password", sealed) == "8841-2203-5517"
    with pytest.raises(ValueError, match="does not open"):
        unseal(OTHER_KEY, "card_password", sealed)
    with pytest.raises(ValueError, match="does not open"):
        unseal(KEY, "card_no", sealed)  # moved to another field
    with pytest.raises(ValueError, match="not a sealed value"):
        unseal(KEY, "card_password", MASK)


def test_the_same_value_seals_differently_each_time() -> None:
    # A random nonce: equal card passwords cannot be spotted across events.
    assert seal(KEY, "card_no", "6222020200112233") != seal(KEY, "card_no", "6222020200112233")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not base64!", "not base64"),
        (base64.b64encode(b"short").decode(), "5 bytes where AES-256 needs 32"),
    ],
)
def test_a_card_key_must_be_32_bytes_of_base64(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        card_cipher(Secret(text))


def test_a_bad_card_key_stops_start_up_naming_the_key_not_the_value() -> None:
    account = {**ACCOUNT, "card_key": "env:CARD_KEY"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"accounts": [account]}, env={"CARD_KEY": "c2VjcmV0LWtleQ=="})
    assert caught.value.key == "accounts[0].card_key"
    assert "openssl rand -base64 32" in str(caught.value)
    assert "c2VjcmV0LWtleQ" not in str(caught.value)
    good = parse_config({"accounts": [account]}, env={"CARD_KEY": KEY.reveal()})
    assert good.accounts[0].card_key == KEY


def test_with_a_card_key_card_fields_are_sealed_and_credentials_still_masked() -> None:
    config = parse_config({"accounts": [{**ACCOUNT, "card_key": KEY.reveal()}]})
    details = {"card_list": [{"card_no": "6222020200112233", "card_password": "99"}], "key": "k1"}
    hidden = mask_secrets(details, hider(config.accounts[0].card_key))
    card = hidden["card_list"][0]
    assert unseal(KEY, "card_no", card["card_no"]) == "6222020200112233"
    assert unseal(KEY, "card_password", card["card_password"]) == "99"
    assert hidden["key"] == MASK


def test_the_readmes_recipe_opens_a_sealed_value() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    recipe = readme.split("To open one:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(recipe), namespace)
    sealed = seal(KEY, "card_password", "8841")
    assert namespace["unseal"](KEY.reveal(), "card_password", sealed) == "8841"
