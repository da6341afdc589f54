"""Errors that are the user's to fix: the CLI prints the message and exits with code 2."""


class MutaskError(Exception):
    """Bad input (a task, a directory, a state, an artifact): the message names the problem and the fix."""

    exit_code = 2
