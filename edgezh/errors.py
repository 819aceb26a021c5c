"""Errors that are the user's to fix: shown as one clear message, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input (a file, a recipe value, a missing extra). The message says what and where."""
