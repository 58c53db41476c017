"""What the fuzz suites watch in the logs: any record at WARNING or above that carries a traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# uvicorn's loggers do not all propagate to the root: watch them too
WATCHED = ("", "uvicorn", "uvicorn.error", "uvicorn.asgi")


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record not in self.records:
            self.records.append(record)


@contextlib.contextmanager
def capturing_tracebacks() -> Iterator[Tracebacks]:
    handler = Tracebacks()
    loggers = [logging.getLogger(n) for n in WATCHED]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
