"""The one error type users see.

Raise ``SlmigrateError("what was wrong; what was expected; what to do")`` for anything the user can fix.
The CLI prints it as ``Error: ...`` with exit code 1 and no traceback; any other exception keeps its traceback
because it is a bug in slmigrate, not a mistake of the user.
"""


class SlmigrateError(Exception):
    """A problem the user can fix. The message says what, what was expected, and what to do."""

    exit_code = 1


class GateFailed(SlmigrateError):
    """A quality gate (``evaluate --fail-under``) was not met; exit code 3 so CI can tell it apart."""

    exit_code = 3
