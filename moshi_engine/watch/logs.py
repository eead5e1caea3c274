"""The server's log: every line about a conversation carries its id, as readable text or JSON.

    configure_logging("json")                 # one JSON object a line, for log collectors
    with conversation_context("3f9a0c1e"):     # every line logged in here, and in the tasks
        log.info("started")                    # started from here, carries conversation=3f9a0c1e

A conversation's id is short and random (`new_conversation_id`), or, on the page's WebRTC
path, the first characters of the connection's id: the same id is in the recording's name
and in the page's details. The id rides on a context variable, so lines logged by the code a
conversation runs through (the session, the engine) carry it without being handed it; a
LogRecord factory copies it onto every record (`record.conversation`, None outside one), for
any handler and any formatter. `log_fields(...)` puts named fields on one line (the end of a
conversation: its transport, duration, first audio, ending): JSON writes them as keys, text
as `key=value` after the message (those that are None left out).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import secrets
import sys
from collections.abc import Iterator

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

CONVERSATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("moshi_conversation", default=None)
_format = TEXT  # what configure_logging set, for the model's process to log alike


def new_conversation_id() -> str:
    """A short random id for a conversation (8 hex digits)."""
    return secrets.token_hex(4)


def current_conversation() -> str | None:
    """The id of the conversation the running code is about (None outside one)."""
    return CONVERSATION.get()


@contextlib.contextmanager
def conversation_context(conversation_id: str | None) -> Iterator[None]:
    """Lines logged in here (and in tasks created in here) are about `conversation_id`."""
    token = CONVERSATION.set(conversation_id)
    try:
        yield
    finally:
        CONVERSATION.reset(token)


def log_fields(**fields: object) -> dict:
    """`extra=` for one log call: named fields of that line (JSON keys; `key=value` in text)."""
    return {"fields": fields}


def _factory_with_conversation(previous):
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.conversation = CONVERSATION.get()
        return record

    factory.moshi_conversation = True
    return factory


def _install_factory() -> None:
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "moshi_conversation", False):
        logging.setLogRecordFactory(_factory_with_conversation(factory))


_install_factory()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: [conversation] message key=value ...`: readable, one line each."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        conversation = getattr(record, "conversation", None)
        if conversation:
            head, _, message = line.partition(": ")
            line = f"{head}: [{conversation}] {message}"
        fields = getattr(record, "fields", None)
        if fields:
            line += "".join(f" {key}={_text_value(value)}" for key, value in fields.items() if value is not None)
        return line


def _text_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in "\"=" for c in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the conversation's
    id when the line is about one, the line's fields, and a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        conversation = getattr(record, "conversation", None)
        if conversation:
            entry["conversation"] = conversation
        for key, value in (getattr(record, "fields", None) or {}).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str = TEXT, level: int = logging.INFO) -> None:
    """The root logger writes `log_format` ("text" or "json") lines to stderr at `level`."""
    global _format
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    _format = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == JSON else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a log line too, not a bare stderr line


def current_format() -> str:
    """The format `configure_logging` last set ("text" before any call)."""
    return _format
