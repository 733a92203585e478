"""User-facing errors.

A :class:`UserError` is raised for anything the user can fix (a bad path, flag, label file or
checkpoint). The CLIs catch it and print its message as one line, then exit with status 2, so a
user never sees a traceback for their own mistake. Programming errors stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input; the message names it in one line."""
