"""Secrets stay out of sight: the Secret wrapper and card-data masking."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from bridge.accounts import Secret
from bridge.redact import mask_secrets, mask_text, shown


def test_secret_hides_its_value() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2"


def test_masks_at_any_depth_and_in_php_style_form_keys() -> None:
    payload = {
        "order": {"card_list": [{"card_no": "6212345678901234", "card_password": "pw"}]},
        "card_list[0][card_password]": "pw2",
        "card_list[0][card_show_type]": "1",
        "pin": "0000",
        "short_card": {"card_no": "1234"},
        "empty": {"cvv": ""},
    }
    masked = mask_secrets(payload)
    assert masked["order"]["card_list"][0] == {
        "card_no": "************1234",
        "card_password": "******",
    }
    assert masked["card_list[0][card_password]"] == "******"
    assert masked["card_list[0][card_show_type]"] == "1"
    assert masked["pin"] == "******"
    assert masked["short_card"]["card_no"] == "******"
    assert masked["empty"]["cvv"] == ""


def test_masks_inside_json_text() -> None:
    text = json.dumps([{"card_no": "6212345678901234", "card_password": "pw"}])
    masked = json.loads(mask_secrets({"card_list": text})["card_list"])
    assert masked == [{"card_no": "************1234", "card_password": "******"}]


def test_leaves_other_text_alone() -> None:
    payload = {"note": "[not json", "hint": "{also not}", "n": 3}
    assert mask_secrets(payload) == payload


CARD = "6212345678901234"
PASSWORD = "4821-0937"


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"ordersn": "D1", "card_list": [{"card_no": CARD, "card_password": PASSWORD}]}),
        # Cut off, as a malformed body may be.
        f'{{"ordersn": "D1", "card_list": [{{"card_no": "{CARD}", "card_password": "{PASSWORD}',
        # JSON written into a JSON string.
        json.dumps({"card_list": json.dumps([{"card_no": CARD, "card_password": PASSWORD}])}),
        # Form, with the list as percent-encoded JSON (kasushou) or raw JSON.
        urllib.parse.urlencode(
            {"card_list": json.dumps([{"card_no": CARD, "card_password": PASSWORD}])}
        ),
        f'card_list=[{{"card_no":"{CARD}","card_password":"{PASSWORD}"}}]&sign=x',
        # PHP-style keys, percent-encoded or not.
        urllib.parse.urlencode(
            {"card_list[0][card_no]": CARD, "card_list[0][card_password]": PASSWORD}
        ),
        f"card_list[0][card_no]={CARD}&card_list[0][card_password]={PASSWORD}",
    ],
)
def test_mask_text_masks_json_form_and_json_inside_form(text: str) -> None:
    masked = mask_text(text)
    assert PASSWORD not in masked
    assert CARD not in masked
    assert "1234" in masked  # the card's last four digits stay


def test_mask_text_masks_every_secret_field_and_numbers() -> None:
    text = json.dumps(
        {
            "cvv": 123,
            "cvc": "456",
            "pin": 9876,
            "key": "k-1",
            "secret": "s-1",
            "api_key": "a-1",
            "card_number": int(CARD),
            "CVV2": "kept",
            "monkey": "kept",
        }
    )
    masked = json.loads(mask_text(text))
    assert masked == {
        "cvv": "******",
        "cvc": "******",
        "pin": "******",
        "key": "******",
        "secret": "******",
        "api_key": "******",
        "card_number": "************1234",
        "CVV2": "kept",
        "monkey": "kept",
    }
    form = mask_text("pin=1234&CVV=999&amount=1.00&note=a+b")
    assert form == "pin=******&CVV=******&amount=1.00&note=a+b"


def test_mask_text_leaves_other_text_and_is_idempotent() -> None:
    text = '{"ordersn": "D1", "note": "a=b&c", "list": ["x", "y"], "status": 3}'
    assert mask_text(text) == text
    masked = mask_text(json.dumps({"card_no": CARD, "card_password": PASSWORD}))
    assert mask_text(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        # Names written otherwise than in plain text, as masking reads them.
        '{"\\u0063vv": "123", "ordersn": "D1"}',
        "c%76v=123&ordersn=D1",
        '{"CVV": "123"}',
        "+cvv+=123",
        '{"\u212aey": "123"}',  # KELVIN SIGN, "k" in lower case
        '{"card_list": "[{\\"pin\\": \\"123\\"}]"}',
    ],
)
def test_mask_text_finds_names_however_written(text: str) -> None:
    assert "123" not in mask_text(text)


def test_mask_text_returns_text_naming_no_secret_as_it_is() -> None:
    text = '{"order_no":"2026120229402838","status":"4","total":"10.00","currency":"USD"}'
    assert mask_text(text) is text


@pytest.mark.parametrize(
    "text", ['"\\"' * 20_000, '"' + "a" * 60_000, '{"a":' * 12_000, "&=" * 30_000]
)
def test_mask_text_stays_fast_on_hostile_input(text: str) -> None:
    started = time.perf_counter()
    mask_text(text)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("D1007-ok/订单", "D1007-ok/订单"),
        ("L1\r\n2026-01-01 ERROR forged", "L1\\r\\n2026-01-01 ERROR forged"),
        ("\x1b[2J\x1b[31mred\x00", "\\x1b[2J\\x1b[31mred\\x00"),
        ("invoice\u202egnp.exe", "invoice\\u202egnp.exe"),  # right-to-left override
        ("a\u200bb\u2028c\u2029d\u00a0e\ufeff", "a\\u200bb\\u2028c\\u2029d\\xa0e\\ufeff"),
        ("lone \ud800", "lone \\ud800"),
        # A backslash in the input can't pass for an escape.
        ("C:\\n", "C:\\\\n"),
    ],
)
def test_shown_escapes_what_could_forge_or_hide_a_log_line(text: str, line: str) -> None:
    assert shown(text) == line
    assert shown(text).isprintable()


def test_shown_cuts_long_text() -> None:
    assert shown("x" * 128) == "x" * 128
    assert shown("x" * 129) == "x" * 128 + "..."
    assert shown("\n" * 10_000, limit=4) == "\\n" * 4 + "..."


def test_mask_secrets_copies_only_what_it_masks() -> None:
    plain = {"order_no": "1", "status": 4, "items": [{"sku": "a"}], "note": '{"x": 1}'}
    assert mask_secrets(plain) is plain  # nothing to mask: no copy

    payload = {"order_no": "1", "cards": [{"sku": "a"}, {"card_no": "6212345678901234"}]}
    original = json.loads(json.dumps(payload))
    masked = mask_secrets(payload)
    assert masked == {
        "order_no": "1",
        "cards": [{"sku": "a"}, {"card_no": "************1234"}],
    }
    assert payload == original  # the payload itself is left as it was
    assert list(masked) == list(payload)  # members in their order


def test_field_names_are_told_apart_however_many_come() -> None:
    names = [f"field_{n}" for n in range(5000)]
    payload = {name: "x" for name in names} | {"CVV ": "123", "pin": "1"}
    masked = mask_secrets(payload)
    assert masked["CVV "] == masked["pin"] == "******"
    assert all(masked[name] == "x" for name in names)
    assert mask_secrets({"card_password": "p"}) == {"card_password": "******"}
