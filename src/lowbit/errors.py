"""The one exception type lowbit raises for problems a user can fix (bad input, missing files).

The CLI prints such errors as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input or environment, described in one actionable sentence."""


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of another library's error message (its name if it has none), shortened:
    what goes after the colon of a one-line lowbit error."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if first.endswith(":") and len(lines) > 1:  # a heading ("... validation error:"): add why
        first = f"{first} {lines[1]}"
    return first if len(first) <= limit else first[: limit - 3] + "..."
