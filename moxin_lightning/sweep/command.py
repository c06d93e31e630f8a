"""A trial's command line, built from the spec's `command:` the way W&B's agent builds it.

The agent (wandb/wandb_agent.py, `Agent._command_run`, with wandb/sdk/launch/sweeps/utils.py) first replaces
`${envvar:NAME}` inside any word by that environment variable (or NAME when unset), then replaces each word that is
exactly a macro by a list of words: `${env}` -> /usr/bin/env, `${interpreter}` -> python, `${program}` -> the
spec's program, `${args}` -> `--name=value` for every parameter, and the other argument formats below. Values
are written with Python's str(), which YAML (and so jsonargparse) reads back: 0.001, True, [0.9, 0.95].

Offline, `${interpreter}` is this Python (sys.executable) rather than whatever `python` is first on the PATH.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


def argument_forms(arguments: dict[str, Any]) -> dict[str, Any]:
    """The argument macros of one trial, by macro name (`args_json_file` is added by `expand_command`)."""
    flags = [f"{name}={value}" for name, value in arguments.items()]
    return {
        "args": [f"--{flag}" for flag in flags],
        "args_no_equals": [word for name, value in arguments.items() for word in (f"--{name}", str(value))],
        "args_no_hyphens": flags,
        "args_no_boolean_flags": [
            f"--{name}" if isinstance(value, bool) else f"--{name}={value}"
            for name, value in arguments.items()
            if value is not False
        ],
        "args_json": [json.dumps(arguments)],
        "args_dict": dict(arguments),
        "args_append_hydra": [f"+{flag}" for flag in flags],
        "args_override_hydra": [f"++{flag}" for flag in flags],
    }


def expand_command(
    command: list[str],
    arguments: dict[str, Any],
    program: str | None = None,
    interpreter: str = "python",
    args_json_file: str | None = None,
    environ: dict[str, str] | None = None,
) -> list[str]:
    """The words W&B's agent would run for `command` with these parameter values."""
    env = os.environ if environ is None else environ
    macros: dict[str, Any] = {
        **argument_forms(arguments),
        "env": ["/usr/bin/env"],
        "interpreter": [interpreter],
        "program": [program],
        "args_json_file": [args_json_file],
    }
    words: list[str] = []
    for word in command:
        word = _ENVVAR.sub(lambda match: env.get(match.group(1), match.group(1)), str(word))
        if word.startswith("${") and word.endswith("}"):
            words += list(macros.get(word[2:-1]) or [])  # args_dict contributes its keys, as in the agent
        else:
            words.append(word)
    return words
