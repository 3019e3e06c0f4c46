"""Structured logs (structlog) for the server process and the worker process it spawns: one format, stderr.

The server configures its logs from --log-level / --log-format and leaves the settings in the environment, which
the spawned worker (and its tensor-parallel ranks) inherit and read back, so the worker's lines (a failed step,
fault injection) come out in the same format on the same stream, never on stdout (whose first line is the
server's "listening on" banner).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

ENV = "QNEXT_LOG"  # "<level>,<format>" as the server was given them


def configure_logging(level: str, fmt: str) -> None:
    json_logs = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr), cache_logger_on_first_use=True)
    os.environ[ENV] = f"{level},{fmt}"


def configure_logging_from_env() -> None:
    """In a spawned process: the server's settings, or info / auto when there is no server (tests)."""
    level, _, fmt = os.environ.get(ENV, "info,auto").partition(",")
    configure_logging(level, fmt or "auto")
