"""Card secrets sealed for consumers, for an account that sets a `card_key`.

Without a key, card numbers and passwords in status events are masked. With one, each
is sealed instead: `sealed:v1:` then the URL-safe base64 of a 12-byte random nonce and
the AES-256-GCM ciphertext and tag of the UTF-8 value, with the field's name (such as
`card_password`) as associated data, so a value moved to another field does not open.
Consumers that hold the key open values with `unseal()`, or the few lines in the README.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.accounts import Secret
from bridge.redact import CARD_FIELDS, mask_value

PREFIX = "sealed:v1:"
_NONCE_BYTES = 12


def card_cipher(key: Secret) -> AESGCM:
    """The cipher of a `card_key` setting: 32 bytes, base64-encoded. ValueError otherwise."""
    try:
        raw = base64.b64decode(key.reveal(), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes where AES-256 needs 32")
    return AESGCM(raw)


def seal(key: Secret, field: str, value: str) -> str:
    nonce = os.urandom(_NONCE_BYTES)
    sealed = card_cipher(key).encrypt(nonce, value.encode(), field.encode())
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(key: Secret, field: str, token: str) -> str:
    """The value `seal(key, field, value)` sealed. ValueError for anything else."""
    if not token.startswith(PREFIX):
        raise ValueError("not a sealed value")
    try:
        raw = base64.urlsafe_b64decode(token.removeprefix(PREFIX))
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        return card_cipher(key).decrypt(nonce, sealed, field.encode()).decode()
    except (binascii.Error, InvalidTag):
        raise ValueError("does not open with this key and field") from None


def hider(key: Secret | None) -> Callable[[str, Any], Any]:
    """How the secret fields of status events are hidden: card fields sealed with an
    account's `card_key`, everything else (and everything without a key) masked."""
    if key is None:
        return mask_value

    def hide(field: str, value: Any) -> Any:
        if field not in CARD_FIELDS or value in (None, ""):
            return mask_value(field, value)
        return seal(key, field, str(value))

    return hide
