"""Logging a background job that keeps failing: once when it starts, once when it stops.

Jobs that retry on a timer (the system sampler, the cache epoch sync, the broker's
subscription) fail every round while a dependency is down. A line per round is a flood
(a traceback a second per worker during a database outage) that buries the lines an
operator needs; two lines say when the outage began and ended, and the metrics and
readiness checks say the rest.
"""

from typing import Any


class OutageLog:
    """``failed`` in a job's error handler, ``succeeded`` after a round that worked."""

    def __init__(self, logger: Any, failing: str, recovered: str) -> None:
        self.logger = logger
        self.failing_event = failing
        self.recovered_event = recovered
        self.failing = False

    def failed(self, **fields: Any) -> None:
        """Logs the first failure of a run, as a warning with the current exception."""
        if not self.failing:
            self.logger.warning(self.failing_event, exc_info=True, **fields)
        self.failing = True

    def succeeded(self) -> None:
        if self.failing:
            self.logger.info(self.recovered_event)
        self.failing = False
