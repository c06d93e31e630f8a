"""How every command reports a mistake in its input: `error: <one line saying what and how to fix it>`, exit 2.

Our checks raise these exception types with a one-line message; anything else is a bug and keeps its
traceback. MOXIN_TRACEBACK=1 shows the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def exit_with(error: BaseException) -> NoReturn:
    """Print the error's first line as `error: ...` and exit 2 (re-raise it under MOXIN_TRACEBACK=1)."""
    if os.environ.get("MOXIN_TRACEBACK"):
        raise error
    text = _raised_in_worker(str(error).strip())
    print(f"error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
    sys.exit(2)


def _raised_in_worker(text: str) -> str:
    """The original message of an error a DataLoader worker raised: torch re-raises it in the main process as
    "Caught X in DataLoader worker process N." followed by the worker's traceback, whose last line is the message."""
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.splitlines()[-1]
    _, separator, message = last.partition(": ")
    return message if separator else last
