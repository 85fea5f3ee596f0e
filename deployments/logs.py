"""The Ingress replica's logs: the server's own lines in Serve's log; fal's status polls and Serve's
routine internals out of it at INFO."""

from __future__ import annotations

import logging
import re

SERVE_LOGGER = "ray.serve"
# Serve's access-log message: "[client ]METHOD ROUTE STATUS LATENCYms"; fal's clients poll the status route
# every 0.1 s while a request runs, so at INFO these lines would be most of the log.
STATUS_POLL = re.compile(r"\bGET /queue/\S+/status 2\d\d\b")
# Serve's router says it started its long-poll client ("Started <...SharedRouterLongPollClient object
# at 0x...>.") inside the first request, so the line carries that request's ids and reads as part of it.
ROUTER_START = re.compile(r"(^|\] )Started <ray\.serve\._private\.\S+ object at 0x[0-9a-f]+>\.?$")


class RoutineLinesAtDebug(logging.Filter):
    """Demotes a successful status poll's access-log line, and the router's start, to DEBUG: shown only
    when Serve logs at DEBUG."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        poll = getattr(record, "serve_access_log", False) and STATUS_POLL.search(message)
        if not (poll or ROUTER_START.search(message)):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.logger.isEnabledFor(logging.DEBUG)


def configure_ingress_logs(app_logger: str = "server") -> None:
    """Called in the replica, after Serve set up its logger: the server package's lines go through
    Serve's handlers (its format, its request id, its log files) instead of Ray's bare stderr, which
    drops INFO; routine lines are demoted."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    serve_logger.addFilter(RoutineLinesAtDebug(serve_logger))
    logger = logging.getLogger(app_logger)
    logger.handlers = list(serve_logger.handlers)
    logger.setLevel(serve_logger.level)
    logger.propagate = False
