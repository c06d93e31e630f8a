"""Reading the JSON files a user hands us (`manifest.json`, `config.json`, weight indexes) with one-line errors.

`json.loads` raises a `JSONDecodeError` ("Expecting value: line 1 column 1 (char 0)") that names neither the
file nor the fix; a truncated copy or a hand edit gone wrong is the usual cause, so the error says that too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class BadJSONFile(ValueError):
    """A JSON file that does not parse (or is not an object): names the file, where it breaks, and the fix."""


def parse_json(text: str, where: str | Path, fix: str) -> dict[str, Any]:
    """`text` (the contents of `where`) as a JSON object, or BadJSONFile naming `where` and `fix`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadJSONFile(
            f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): it is "
            f"truncated or was edited; {fix}"
        ) from None
    if not isinstance(value, dict):
        raise BadJSONFile(f"{where} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def read_json(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in the file `path`; BadJSONFile (one line, naming the file) when it does not parse."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadJSONFile(f"{path} is not UTF-8 text: it is damaged or not a JSON file; {fix}") from None
    return parse_json(text, path, fix)
