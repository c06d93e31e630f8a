"""Evaluation with lm-evaluation-harness: the `MoxinLM` model ("moxin"), the shipped task sets, the `eval` command.

Importing `moxin_lightning.evaluation.lm` registers the model with the harness; `task_sets.TASKS_DIR` is the
folder to pass as lm-eval's `include_path` (`local/`: the offline set `moxin_local`; `hub/`: Moxin's reported
few-shot and zero-shot settings as the groups `moxin_fewshot` and `moxin_zeroshot`).
"""
