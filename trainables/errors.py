"""The one exception type for mistakes a user can fix (bad specs, missing files, bad data).

Entry points catch :class:`UserError` and print its message (which names the problem
and the fix) without a traceback, then exit non-zero. Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says what is wrong and how to fix it."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the trial stops and says where and what to change."""
