"""User-facing errors.

Every problem a user can fix (bad path, unknown name, malformed data, ...) is raised as a
:class:`SemalignError` whose message names the problem *and* the fix in one line. The CLI prints
it as ``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class SemalignError(Exception):
    """An error caused by user input, with a one-line message that says how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
        self.message = message


class NonFiniteLossError(SemalignError):
    """Training produced a NaN/inf loss; the last good state has been kept."""
