"""The one error family edgetl raises for bad input.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code`` (2 for bad input).
"""

from __future__ import annotations


class EdgetlError(Exception):
    """Bad input or an impossible request, described in the user's words.

    Attributes:
        exit_code: process exit code the CLI uses (2: bad input; 1: a check failed).
    """

    exit_code = 2


class VerificationError(EdgetlError):
    """An export was written but failed its verification (integer-only or accuracy gate)."""

    exit_code = 1
