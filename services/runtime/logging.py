"""Log set-up: console lines on a terminal, JSON lines otherwise, call context first.

Every line logged while a call runs carries its request id and method (from the
current `Call`, calls.py). The pipeline's canonical per-RPC line (`rpc_line`) is the
one line every call writes, so it skips structlog's per-line machinery: its fields
go straight to orjson. JSON lines are gathered in a small buffer and written whole,
many per write(), at most `flush_seconds` after they were logged (at once for
warnings and errors): a write() per call would cost more than the rest of the line.
A write never ends mid-line and holds at most PIPE_BUF bytes (a pipe takes it whole),
so processes sharing an output never interleave lines.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import select
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import structlog
import structlog.tracebacks

from services.runtime import calls
from services.runtime.process import write_all

LogFormat = Literal["auto", "console", "json"]

_LEVELS = logging.getLevelNamesMapping()
_LEVEL_NAMES = {number: logging.getLevelName(number).lower() for number in (10, 20, 30, 40, 50)}
_MAX_BUFFERED_BYTES = 64 * 1024
_ATOMIC_WRITE_BYTES = select.PIPE_BUF


def add_call_context(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The current call's request id and method, on every line logged during it."""
    call = calls.current()
    if call is not None:
        event.setdefault("request_id", call.request_id)
        event.setdefault("method", call.method)
    return event


def _orjson_line(_logger: object, _name: str, event: structlog.typing.EventDict) -> bytes:
    return orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _timestamp() -> str:
    # The same form as structlog's TimeStamper(fmt="iso", utc=True).
    return datetime.now(UTC).isoformat()[:-6] + "Z"


class _LineBuffer:
    """Whole lines for stdout, written together; stdout is looked up at each write so
    a test that captures sys.stdout sees them."""

    def __init__(self) -> None:
        self.flush_seconds = 0.0
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes, *, urgent: bool = False) -> None:
        self._lines.append(line)
        self._size += len(line)
        if urgent or self.flush_seconds <= 0 or self._size >= _MAX_BUFFERED_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to flush later: write now
                self.flush()
                return
            self._timer = loop.call_later(self.flush_seconds, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        # stdout gone (a closed pipe or terminal): drop the lines rather than fail
        # the call, the timer or the exit that is flushing them.
        with contextlib.suppress(OSError, ValueError):
            self._write(lines)

    @staticmethod
    def _write(lines: list[bytes]) -> None:
        stream = sys.stdout.buffer
        # Each write holds whole lines and at most PIPE_BUF bytes (unless one line is
        # longer): a pipe takes such a write atomically, so even processes that share
        # one pipe never interleave within a line.
        pending: list[bytes] = []
        size = 0
        for line in lines:
            if pending and size + len(line) > _ATOMIC_WRITE_BYTES:
                write_all(stream, b"".join(pending))
                pending, size = [], 0
            pending.append(line)
            size += len(line)
        if pending:
            write_all(stream, b"".join(pending))


_BUFFER = _LineBuffer()
atexit.register(_BUFFER.flush)


class _LineLogger:
    """structlog's output for JSON lines: into the shared buffer, in order with rpc lines."""

    def msg(self, line: bytes) -> None:
        _BUFFER.add(line)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_LINE_LOGGER = _LineLogger()

# Tracebacks without local variables: a frame's locals hold the call (its metadata,
# with the caller's API key) and the request (a prompt), which must never be logged.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class _RpcLines:
    """How `rpc_line` writes, set by configure_logging."""

    json = True
    min_level = _LEVELS["INFO"]


_rpc_log = structlog.get_logger("tensorgate.rpc")


def rpc_line(level: int, fields: dict[str, Any]) -> None:
    """Writes the canonical line of one call (event "rpc") at `level` (logging's numbers)."""
    if level < _RpcLines.min_level:
        return
    if not _RpcLines.json:
        _rpc_log.log(level, "rpc", **fields)
        return
    fields["event"] = "rpc"
    fields["level"] = _LEVEL_NAMES[level]
    fields["timestamp"] = _timestamp()
    _BUFFER.add(
        orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE),
        urgent=level >= logging.WARNING,
    )


def flush_logs() -> None:
    """Writes out buffered lines now (on shutdown, or before reading them in a test)."""
    _BUFFER.flush()


def configure_logging(
    *, level: str = "info", fmt: LogFormat = "auto", flush_seconds: float = 0.0
) -> None:
    """Configures logging once per process; `auto` picks console on a TTY, else JSON.

    `flush_seconds` > 0 lets JSON lines wait that long to be written in batches.
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_call_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    _BUFFER.flush()
    _BUFFER.flush_seconds = flush_seconds
    _RpcLines.json = not use_console
    _RpcLines.min_level = _LEVELS[level.upper()]
    if use_console:
        processors: list[structlog.typing.Processor] = [
            *shared,
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
                if _has_rich()
                else structlog.dev.plain_traceback
            ),
        ]
        factory: object = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [*shared, _TRACEBACKS, _orjson_line]

        def factory(*_args: object) -> _LineLogger:
            return _LINE_LOGGER

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.upper()]),
        logger_factory=factory,  # type: ignore[arg-type]
        # Not cached: loggers made at import follow a later configure (tests do that).
        cache_logger_on_first_use=False,
    )
