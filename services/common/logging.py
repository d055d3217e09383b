"""Structured logs for every service: one JSON object per line, each carrying the request id.

``configure_logging`` is applied once per process by the service entry point (``services.common.serve``),
uvicorn's access and error logs included. The request id lives in a context variable set by the request
middleware (``services.common.app``), so every line written while a request is served carries it: lines
from worker threads too (anyio copies the context into them).

Logs hold lengths, hashes and ids, never payloads: no image bytes, question or report text, API keys.
Code must not log those in the first place; as a safety net the formatters also mask bearer tokens, our
API keys and base64 data URLs should one slip into a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]
AUDIT_LOGGER = "mmedrag.audit"

request_id_var: ContextVar[str | None] = ContextVar("mmedrag_request_id", default=None)

# Attributes every LogRecord has: anything else on a record came in through ``extra=`` and is logged.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "service",
    "request_id",
    "trace_id",
    "span_id",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
_SECRETS = [
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"\bmmr_[A-Za-z0-9_-]{8,}"), "mmr_[redacted]"),
    (
        re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,[A-Za-z0-9+/=]+"),
        lambda m: f"data:{m.group(1)};base64,[{len(m.group(0))} chars]",
    ),
]


def redact(text: str) -> str:
    """Mask bearer tokens, router API keys and base64 data URLs in a log message."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def fingerprint(data: bytes | str) -> str:
    """A short SHA-256 prefix: enough to correlate two log lines about the same payload, not to read it."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:16]


try:  # tracing is optional; its API is light and imported once
    from opentelemetry import trace as _otel_trace
except ImportError:
    _otel_trace = None


def _trace_ids() -> tuple[str | None, str | None]:
    """The current OpenTelemetry trace and span ids, when tracing is installed and a span is active."""
    if _otel_trace is None:
        return None, None
    context = _otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class RequestContextFilter(logging.Filter):
    """Stamp each record with the service name, the request id and (when tracing) the trace id."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id, record.span_id = _trace_ids()
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")
    }
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        # uvicorn's access line: (client, method, path with query, HTTP version, status)
        client, method, path, _, status = record.args
        fields.update(client=client, method=method, path=path, status=status)
    return fields


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, service, request_id, message, then extra fields."""

    def __init__(self, service: str | None = None):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": getattr(record, "service", None) or self.service,
            "request_id": getattr(record, "request_id", None),
            "message": redact(record.getMessage()),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", None)
        for key, value in _extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal; the same fields, extra ones as ``key=value``."""

    def __init__(self, service: str | None = None):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        service = getattr(record, "service", None) or self.service or "-"
        request_id = getattr(record, "request_id", None) or "-"
        line = f"{ts} {service} {record.levelname} {record.name} [{request_id}] {redact(record.getMessage())}"
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def make_handler(service: str, fmt: LogFormat = "json", stream: Any = None) -> logging.Handler:
    """A stream handler with the service's formatter and the request-context filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.addFilter(RequestContextFilter(service))
    return handler


def configure_logging(service: str, level: str = "info", fmt: LogFormat = "json", stream: Any = None) -> None:
    """Route every log of the process (ours, uvicorn's, libraries') through one handler on the root logger.

    Uvicorn must then run with ``log_config=None`` so it keeps these handlers instead of its own.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(service, fmt, stream))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # One INFO line per outgoing call (httpx) would cost more than the call's bookkeeping: warnings only.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # Audit records are written whatever the level, so that turning logs down never loses them.
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
