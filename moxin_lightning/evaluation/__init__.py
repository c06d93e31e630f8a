"""Evaluation with lm-evaluation-harness: the `MoxinLM` model ("moxin"), the shipped task sets, the `eval` command
and in-loop evaluation.

Importing `moxin_lightning.evaluation.lm` registers the model with the harness; `task_sets.TASKS_DIR` is the
folder to pass as lm-eval's `include_path` (`local/`: the offline set `moxin_local`; `hub/`: Moxin's reported
settings on Hub datasets: `moxin_fewshot` and `moxin_zeroshot` (base), `moxin_instruct` (Instruct, OLMES-style)
and `moxin_reasoning` (pass@1 of sampled completions), with the functions of our own task definitions in
`task_utils`). `in_loop.TaskSet` scores a task set on a model while it trains (the `InLoopEvaluation` callback).
"""
