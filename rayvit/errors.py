"""Errors meant for the person at the keyboard, not for a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data path, cluster size).

    Entry points print ``str(exc)`` on one line and exit non-zero.
    """
