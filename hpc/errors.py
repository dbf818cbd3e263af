"""Errors a user can act on. The CLI prints their message in one line, never a traceback."""


class HpcError(Exception):
    """A problem with input or environment that the user can fix; the message says what and how."""
