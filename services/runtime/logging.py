"""structlog set-up: console lines on a terminal, JSON lines otherwise, call context first.

Every line logged while a call runs carries its request id and method (from the
current `Call`, calls.py); the pipeline's canonical per-RPC line carries the rest
of what the handler noted. JSON lines are rendered by orjson and written with one
write() each, so lines from processes sharing an output do not interleave mid-line
(up to the pipe's atomic size; the launcher relays children's lines whole).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson
import structlog

from services.runtime import calls

LogFormat = Literal["auto", "console", "json"]


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


class _LineLogger:
    """Writes each rendered line to stdout's byte stream in one write() call.

    stdout is looked up per line (a few tens of nanoseconds), so a test that
    captures sys.stdout sees every line.
    """

    def msg(self, line: bytes) -> None:
        stream = sys.stdout.buffer
        stream.write(line)
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_LINE_LOGGER = _LineLogger()


def configure_logging(*, level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configures structlog once per process; `auto` picks console on a TTY, else JSON."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_call_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        processors: list[structlog.typing.Processor] = [*shared, structlog.dev.ConsoleRenderer()]
        factory: object = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [*shared, structlog.processors.dict_tracebacks, _orjson_line]

        def factory(*_args: object) -> _LineLogger:
            return _LINE_LOGGER

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
