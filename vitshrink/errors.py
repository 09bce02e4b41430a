"""The one error type for bad user input.

Library code raises ``UserError`` with a one-line message that names the file (or flag) and what
is wrong; the CLI prints it on one line to stderr and exits with code 2.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong shape, an impossible flag value."""

    exit_code = 2

    def __init__(self, message: str, details: str | None = None):
        # One line only: the CLI prints it as-is. ``details`` (any length) is shown with --debug.
        super().__init__(" ".join(str(message).split("\n")).strip())
        self.details = details
