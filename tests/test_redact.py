"""Secrets stay out of sight: the Secret wrapper and card-data masking."""

from __future__ import annotations

import json

from bridge.redact import Secret, mask_secrets


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
