"""The process's log lines: readable text (the default) or one JSON object a line.

Client input is escaped where it enters a message (`bridge.redact.shown`); here, in
both formats, card secrets and credentials left in a message or a traceback are
masked (`bridge.redact.mask_text`), and JSON is escaped by the encoder (`ensure_ascii`:
no control, bidi or other invisible character reaches the collector raw).

A log call that knows the order passes it as `extra=order_fields(key)` (and `ce_id`
where an event has one); JSON lines carry them as fields of their own.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from bridge.clock import iso
from bridge.redact import mask_text

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# Fields a log call may add with `extra=`, shown in JSON lines.
CONTEXT_FIELDS = ("provider", "account", "order_key", "ce_id")
# Loggers whose lines are shown at INFO without -v: the process's start and stop.
LIFECYCLE_LOGGERS = ("bridge.service",)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The handler `setup` added to the root logger (others, such as pytest's, are left alone).
_handler: logging.Handler | None = None


def order_fields(key: str) -> dict[str, str]:
    """`extra=` for a log call about the order `provider/account/order_id`."""
    provider, account, _ = [*key.split("/", 2), "", ""][:3]
    return {"provider": provider, "account": account, "order_key": key}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return mask_text(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return mask_text(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", [provider, account, order_key, ce_id],
    ["exception"]}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_text(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["exception"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=True)


def setup(log_format: LogFormat = "text", *, verbose: bool = False) -> None:
    """Sends every log line to stderr in `log_format`: WARNING and up, INFO with `verbose`,
    and the lifecycle lines always. Called again, it replaces what it set up."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(_handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in LIFECYCLE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # aiokafka logs every failed reconnect (ten a second while Kafka is away); the
    # bridge says once what is wrong, and /readyz tells.
    logging.getLogger("aiokafka").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def fatal(message: str) -> None:
    """The one line a command ends with when it fails: a JSON line in JSON mode."""
    if _handler is not None and isinstance(_handler.formatter, JsonFormatter):
        logging.getLogger("order-bridge").error("%s", message)
    else:
        print(f"order-bridge: {message}", file=sys.stderr)
