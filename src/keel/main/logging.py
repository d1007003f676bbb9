"""Loguru as the single log pipeline: stdlib loggers (server, SQLAlchemy, RQ) are routed into it,
every record carries the request id (and trace ids when tracing), and secrets are scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger
from opentelemetry import trace

from keel.platform.context import request_id_var

if TYPE_CHECKING:
    from loguru import Message, Record

_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [REDACTED]"),
    (re.compile(r"keel_[A-Za-z0-9_-]{8,}"), "keel_[REDACTED]"),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_[REDACTED]"),
    (
        re.compile(r"(?i)(authorization|api[_-]?key|secret|password)(['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"),
        r"\1\2[REDACTED]",
    ),
]
_SENSITIVE_KEYS = {"authorization", "api_key", "apikey", "token", "secret", "password", "x-api-key"}


def redact(text: str) -> str:
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in _SENSITIVE_KEYS:
        return "[REDACTED]"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    return value


def _patch(record: Record) -> None:
    extra = record["extra"]
    rid = request_id_var.get()
    if rid is not None and extra.get("request_id", "-") == "-":
        extra["request_id"] = rid
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        extra["trace_id"] = format(ctx.trace_id, "032x")
        extra["span_id"] = format(ctx.span_id, "016x")
    if "logger_name" in extra:
        record["name"] = extra.pop("logger_name")
    record["message"] = redact(record["message"])
    for key in list(extra):
        extra[key] = _redact_value(key, extra[key])


_encoder = msgspec.json.Encoder(enc_hook=str)


def json_line(message: Message) -> str:
    """One record as the JSON document production logs carry (without the newline)."""
    r = message.record
    doc: dict[str, Any] = {
        "ts": r["time"].isoformat(),
        "level": r["level"].name,
        "msg": r["message"],
        "logger": r["name"],
    }
    doc.update(r["extra"])
    if r["exception"] is not None:
        doc["exception"] = redact("".join(_format_exception(r)))
    return _encoder.encode(doc).decode()


def _json_sink(message: Message) -> None:
    sys.stderr.write(json_line(message) + "\n")


def _format_exception(r: Record) -> list[str]:
    import traceback

    exc = r["exception"]
    assert exc is not None
    return traceback.format_exception(exc.type, exc.value, exc.traceback)


class InterceptHandler(logging.Handler):
    """Route stdlib records into loguru, keeping the original logger name and caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
        logger.opt(depth=depth, exception=record.exc_info).bind(logger_name=record.name).log(level, record.getMessage())


_PRETTY = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <8}</level> "
    "<cyan>{extra[request_id]}</cyan> {message} <dim>{name}</dim>"
)


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    use_json = (not sys.stderr.isatty()) if json is None else json
    logger.remove()
    logger.configure(patcher=_patch, extra={"request_id": "-"} if not use_json else {})
    if use_json:
        logger.add(_json_sink, level=level, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_PRETTY, backtrace=False, diagnose=False)
    # Filter stdlib records at the source: below the level they would only be built to be dropped.
    logging.basicConfig(handlers=[InterceptHandler()], level=logger.level(level).no, force=True)
    for name in ("sqlalchemy.engine", "aiosqlite", "asyncio", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Server access logs duplicate Keel's own access line, which carries the request id.
    for name in ("uvicorn.access", "granian.access"):
        logging.getLogger(name).disabled = True
