"""Finding the tasks an `eval` asks for: our shipped task folders plus lm-eval's own, resolved before any model loads.

`tasks/local` holds the offline task set (`moxin_local`); `tasks/hub` holds Moxin's reported few-shot settings
as groups of lm-eval's Hub tasks (`moxin_fewshot`, `moxin_zeroshot`). Indexing lm-eval's ~15,000 built-in
task names takes seconds, so a request naming only local tasks never builds that index.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_DIR = TASKS_DIR / "local"
HUB_DIR = TASKS_DIR / "hub"


@functools.cache
def task_manager(with_hub: bool):
    """lm-eval's TaskManager over our local tasks, plus (with_hub) our Hub groups and lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    if with_hub:
        return TaskManager(include_path=[str(LOCAL_DIR), str(HUB_DIR)], include_defaults=True)
    return TaskManager(include_path=str(LOCAL_DIR), include_defaults=False)


def parse_task_names(text: str) -> list[str]:
    """'a, b,a' -> ['a', 'b'] (order kept, duplicates dropped); an empty list is an error."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError("--tasks is empty; name tasks or groups, e.g. --tasks moxin_local")
    return names


def resolve_tasks(names: list[str]) -> tuple[Any, list[Any]]:
    """(the TaskManager, the built Task / Group objects) for `names`, datasets loaded.

    Raises ValueError with one line for an unknown name (listing close ones) or a dataset that is neither
    cached nor downloadable (naming the task and the fix)."""
    local = task_manager(with_hub=False)
    manager = local if all(name in local.all_tasks for name in names) else task_manager(with_hub=True)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "the local task set is moxin_local"
            raise ValueError(f"unknown task {name!r}; {hint}")
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:  # datasets' offline / not-found errors
            raise ValueError(_dataset_message(name, error)) from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: the tasks it names
            built.extend(loaded["tasks"].values())
    return manager, built


def _dataset_message(name: str, error: BaseException) -> str:
    quoted = re.search(r"'([^'\s]+/[^'\s]+)'", str(error))  # a Hub id, e.g. 'allenai/ai2_arc'
    dataset = f"dataset {quoted.group(1)!r}" if quoted else "its dataset"
    return (
        f"task {name!r} needs {dataset} from the Hugging Face Hub, which is not in the local cache; run once with "
        "network access (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or evaluate the offline task set "
        "--tasks moxin_local"
    )
