"""Checks of `fit` / `validate` / `test` configs that LightningCLI leaves to a traceback or a message without a file.

- A YAML syntax error: jsonargparse reports it from `<unicode string>`, so with several `--config` files nobody
  knows which one is broken. Each file is parsed first and the error names the file, line and column.
- A batch size <= 0 of any datamodule (or a task's `micro_batch_size`): a datamodule that does not check its own
  would fail deep in a DataLoader or loop forever on empty batches; every `*batch_size` setting is checked by
  name before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def config_files(argv: list[str]) -> list[str]:
    """The values of `--config` / `-c` on a LightningCLI command line, in order."""
    files = []
    for index, word in enumerate(argv):
        if word in ("--config", "-c") and index + 1 < len(argv):
            files.append(argv[index + 1])
        elif word.startswith("--config="):
            files.append(word.split("=", 1)[1])
    return files


def check_config_files(argv: list[str]) -> None:
    """ValueError naming the `--config` file, line and column of a YAML syntax error (inline YAML is left to
    jsonargparse)."""
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark else name
            context = ""
            if error.context and error.context_mark is not None:
                context = f" ({error.context} at line {error.context_mark.line + 1})"
            raise ValueError(f"{where}: YAML syntax error: {error.problem}{context}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{name}: YAML syntax error: {str(error).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{name} is not UTF-8 text; a --config must be a YAML file") from None


def check_batch_sizes(config: Any) -> None:
    """ValueError naming the key and class of any `*batch_size` setting below 1 under `data:` or `model:`."""
    for section in ("data", "model"):
        part = _get(config, section)
        init_args = _get(part, "init_args")
        if init_args is None:
            continue
        items = init_args.items() if hasattr(init_args, "items") else vars(init_args).items()
        for key, value in items:
            if str(key).endswith("batch_size") and isinstance(value, int) and not isinstance(value, bool):
                if value < 1:
                    raise ValueError(
                        f"{section}.init_args.{key}={value} must be >= 1 ({_get(part, 'class_path')}); "
                        "it counts rows (or records) per batch per device"
                    )


def _get(value: Any, key: str) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)
