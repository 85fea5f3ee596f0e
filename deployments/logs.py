"""The Ingress replica's logs: the server's own lines in Serve's log, fal's status polls out of it at INFO."""

from __future__ import annotations

import logging
import re

SERVE_LOGGER = "ray.serve"
# Serve's access-log message: "[client ]METHOD ROUTE STATUS LATENCYms"; fal's clients poll the status route
# every 0.1 s while a request runs, so at INFO these lines would be most of the log.
STATUS_POLL = re.compile(r"\bGET /queue/\S+/status 2\d\d\b")


class StatusPollsAtDebug(logging.Filter):
    """Demotes a successful status poll's access-log line to DEBUG: shown only when Serve logs at DEBUG."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not getattr(record, "serve_access_log", False):
            return True
        if not STATUS_POLL.search(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.logger.isEnabledFor(logging.DEBUG)


def configure_ingress_logs(app_logger: str = "server") -> None:
    """Called in the replica, after Serve set up its logger: the server package's lines go through
    Serve's handlers (its format, its request id, its log files) instead of Ray's bare stderr, which
    drops INFO; status polls are demoted."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    serve_logger.addFilter(StatusPollsAtDebug(serve_logger))
    logger = logging.getLogger(app_logger)
    logger.handlers = list(serve_logger.handlers)
    logger.setLevel(serve_logger.level)
    logger.propagate = False
