"""One line, not a traceback, for a user's error inside a Flower app.

Flower logs an exception escaping a ``ServerApp`` or ``ClientApp`` with its traceback (and marks
the run failed with the exception's text). A bad run config, node config, data directory or model
name (``fedlease.errors.user_errors``) is the user's to fix, as on ``fedlease run``: the filter
below turns such a record into one line naming the culprit. Other exceptions keep their
traceback."""

from __future__ import annotations

import logging

from flwr.common.logger import FLOWER_LOGGER

from ..errors import user_errors


class UserErrorsOnOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, user_errors()):
            record.msg, record.args = f"{record.getMessage()}: {exc}", None
            record.exc_info = record.exc_text = None
        return True


def install() -> None:
    """Adds the filter to Flower's logger, once."""
    if not any(isinstance(f, UserErrorsOnOneLine) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(UserErrorsOnOneLine())
