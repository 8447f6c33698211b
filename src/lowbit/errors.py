"""The one exception type lowbit raises for problems a user can fix (bad input, missing files).

The CLI prints such errors as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input or environment, described in one actionable sentence."""
