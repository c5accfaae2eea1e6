"""Errors caused by what the user gave us (a file, a flag, a value). The CLI prints them as one line."""


class UserError(Exception):
    """A problem with the user's input, described in one line that names the file, field or value."""
