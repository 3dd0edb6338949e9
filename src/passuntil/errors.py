"""The one exception type a user can cause; the CLI turns it into one clear line and exit 2."""


class UserError(Exception):
    """A problem with the user's input (arguments, files, stores), not a bug in passuntil."""
