"""structlog set-up: readable in a terminal, JSON in production, the same event names in both.

Libraries that log through the standard library (uvicorn, psycopg_pool, aiohttp, kubernetes, asyncio) go through the
same renderer, so a terminal shows one readable stream and a log collector gets one JSON line per record, with the
library's logger name kept (`logger`).
"""

from __future__ import annotations

import logging
import sys

import structlog

# Standard-library loggers that are chatty at INFO: their warnings and errors still show.
_QUIET = ("uvicorn.access", "httpx", "httpcore", "kubernetes.client.rest", "urllib3")


def configure(log_format: str = "auto", level: str = "info") -> None:
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()))
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
