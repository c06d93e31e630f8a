"""Finding the tasks an `eval` asks for: our shipped task folders plus lm-eval's own, resolved before any model loads.

`tasks/local` holds the offline task set (`moxin_local`); `tasks/hub` holds Moxin's reported settings on Hub
datasets: groups of lm-eval's tasks (`moxin_fewshot`, `moxin_zeroshot`), the Instruct set (`moxin_instruct`,
lm-eval's tasks plus our `moxin_math` and `moxin_popqa`) and the reasoning set (`moxin_reasoning`, our tasks;
their functions are in `task_utils.py`). Indexing lm-eval's ~15,000 built-in task names takes seconds, so a
request naming only local tasks never builds that index.

Tasks that score a model by running the code it writes (lm-eval's `humaneval`, `humaneval_plus`: `unsafe_code`
in their YAML) are refused unless HF_ALLOW_CODE_EVAL=1, before their YAML is even loaded (lm-eval's humaneval
runs a code_eval self-test when it loads). Our own code never executes model output.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_DIR = TASKS_DIR / "local"
HUB_DIR = TASKS_DIR / "hub"
CODE_EVAL_VARIABLE = "HF_ALLOW_CODE_EVAL"  # lm-eval's (HF evaluate's) opt-in for running model-written code
FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed (simple_evaluate's fewshot_random_seed)


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
    if not code_execution_allowed():
        for name in names:
            if running := code_running_tasks(manager, name):
                where = "" if running == [name] else f" (in {name!r})"
                raise ValueError(
                    f"task {running[0]!r}{where} scores the model by running the code it writes (lm-eval's "
                    f"code_eval); set {CODE_EVAL_VARIABLE}=1 to allow that, in an isolated environment, or leave "
                    f"{', '.join(running)} out"
                )
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:  # datasets' offline / not-found errors
            raise ValueError(_load_message(name, error)) from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: the tasks it names
            built.extend(loaded["tasks"].values())
    return manager, built


def load_task_dict(names: list[str]) -> dict[str, Any]:
    """lm-eval's task dict ({"tasks", "groups", ...}) for `names`, checked and loaded as `resolve_tasks` does, each
    task set up as `simple_evaluate` sets it up (no few-shot count: 0; the few-shot sampler seeded), for
    `lm_eval.evaluator.evaluate`."""
    manager, built = resolve_tasks(names)
    loaded = manager.load(built)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def task_on_files(name: str, data_files: dict[str, str | Path]) -> Any:
    """Task `name` (one task, not a group) reading its records from local files instead of the Hub: `data_files`
    maps each split the task uses to a .jsonl / .json / .parquet / .csv file whose records have the dataset's own
    columns (e.g. a copy of HuggingFaceH4/MATH-500's test split for moxin_math500)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _shipped_index().get(name) or task_manager(with_hub=True).task_index.get(name)
    if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
        raise ValueError(f"{name!r} is not a task defined by a YAML file (a group or tag cannot read local files)")
    suffixes = {Path(path).suffix for path in data_files.values()}
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if len(suffixes) != 1 or next(iter(suffixes)) not in builders:
        raise ValueError(f"data_files {data_files} must all be .jsonl, .json, .parquet or .csv files of one kind")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config.update(
        dataset_path=builders[suffixes.pop()],
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path) for split, path in data_files.items()}},
    )
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    return ConfigurableTask(config=config)


@functools.cache
def _shipped_index() -> dict[str, Any]:
    """lm-eval's index of our task folders alone (milliseconds; lm-eval's own tasks take seconds to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(LOCAL_DIR), str(HUB_DIR)], include_defaults=False).task_index


def code_execution_allowed() -> bool:
    return os.environ.get(CODE_EVAL_VARIABLE) == "1"


def code_running_tasks(manager: Any, name: str) -> list[str]:
    """The tasks under `name` (a task, group or tag) whose YAML sets `unsafe_code`, read from lm-eval's index
    without loading anything."""
    from lm_eval.tasks._index import Kind

    found: list[str] = []
    seen: set[str] = set()

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            if item.get("unsafe_code"):
                found.append(str(item.get("task")))
            for key in ("task", "group"):
                if isinstance(item.get(key), str) and item[key] in manager.task_index:
                    visit(item[key])
            if isinstance(item.get("task"), list):
                for child in item["task"]:
                    visit(child)
            return
        if item in seen or item not in manager.task_index:
            return
        seen.add(item)
        entry = manager.task_index[item]
        if entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                visit(child)
        elif entry.cfg is not None:
            if entry.kind != Kind.GROUP and entry.cfg.get("unsafe_code"):
                found.append(item)
            elif entry.kind == Kind.GROUP:
                for child in entry.cfg.get("task") or []:
                    visit(child)

    visit(name)
    return list(dict.fromkeys(found))


def _load_message(name: str, error: BaseException) -> str:
    """One line for a task that cannot load offline: its metric module (HF evaluate's) or its dataset."""
    metric = re.search(r"Module '([\w-]+)' doesn't exist on the Hugging Face Hub", str(error))
    if metric:
        return (
            f"task {name!r} needs Hugging Face evaluate's {metric.group(1)!r} metric, which is not in the local "
            "cache; run once with network access (HF_HUB_OFFLINE=0 HF_EVALUATE_OFFLINE=0) to cache it"
        )
    return _dataset_message(name, error)


def _dataset_message(name: str, error: BaseException) -> str:
    quoted = re.search(r"'([^'\s]+/[^'\s]+)'", str(error))  # a Hub id, e.g. 'allenai/ai2_arc'
    dataset = f"dataset {quoted.group(1)!r}" if quoted else "its dataset"
    return (
        f"task {name!r} needs {dataset} from the Hugging Face Hub, which is not in the local cache; run once with "
        "network access (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or evaluate the offline task set "
        "--tasks moxin_local"
    )
