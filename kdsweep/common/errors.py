"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input or environment, not a bug in kdsweep."""
