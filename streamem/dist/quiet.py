"""Workers that report bad input as the one line it is.

A task that raises :class:`~streamem.errors.InputError` (a missing or corrupt
store chunk, say) is bad input, not a bug: the client re-raises it and the CLI
prints one line. But each worker also logs every failed task as a multi-line
``Compute Failed`` record with the traceback, and the tasks cancelled after it
as ``CancelledError`` warnings, on the same stderr. The plugin here, registered
on every client streamem opens, drops exactly those records in the workers;
any other failure is still logged in full.
"""

from __future__ import annotations

import logging

from distributed import WorkerPlugin

#: Loggers of the records dropped (worker processes only).
_LOGGERS = ("distributed.worker", "distributed.worker.state_machine")


class InputErrorLogFilter(logging.Filter):
    """Drop a worker's log of a task that failed with InputError, and of cancelled tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Compute Failed"):
            exception_text = record.args[3] if isinstance(record.args, tuple) else ""
            return not str(exception_text).startswith("InputError(")
        return "ended with CancelledError" not in record.getMessage()


class QuietInputErrors(WorkerPlugin):
    """Install :class:`InputErrorLogFilter` on a worker's loggers (idempotent)."""

    name = "streamem-quiet-input-errors"

    def setup(self, worker) -> None:
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, InputErrorLogFilter) for f in logger.filters):
                logger.addFilter(InputErrorLogFilter())


def quiet_input_errors(client) -> None:
    """Register :class:`QuietInputErrors` on every current and future worker of ``client``."""
    client.register_plugin(QuietInputErrors(), name=QuietInputErrors.name)
