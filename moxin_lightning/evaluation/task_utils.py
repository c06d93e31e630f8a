"""Functions the shipped Hub task definitions (`tasks/hub/moxin_*.yaml`) name with `!function`.

Three kinds of task that lm-eval 0.4.13 does not offer in the form Moxin's tables need:

* The reasoning set (`moxin_reasoning`: MATH500, AMC 2023, Minerva Math, OlympiadBench): each dataset's records
  become `{"problem", "answer"}` (`*_docs`); the prompt is the one GRPO trains on (`reasoning_prompt`: the Tülu
  chat layout, the problem and DeepScaleR's instruction in the user turn); several sampled completions per
  problem are kept (`all_completions`) and `pass_at_1` is the fraction whose last `\\boxed{}` answer equals the
  reference (`moxin_lightning.rewards.MathAnswer`: exact for plain numbers, math-verify for the rest).
* MATH in the Minerva format (`moxin_math`, the Instruct set's MATH): lm-eval's `minerva_math` asserts
  antlr4-python3-runtime 4.11 when imported, which math-verify's LaTeX parser (antlr4 4.13) rules out, so it
  cannot load next to math-verify; this one keeps its "Problem:/Solution:" format, 4 shots, and grades the
  boxed answer the same way.
* PopQA (`moxin_popqa`), which lm-eval lacks: "Q: ... A:" with 15 shots, correct when the answer contains one
  of the question's possible answers (case-insensitive), the PopQA paper's accuracy.

Model output is only ever parsed (math-verify), never executed.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

# DeepScaleR's instruction, as conf/grpo.yaml appends it to every training prompt
REASONING_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@cache
def _grader():
    from moxin_lightning.rewards import MathAnswer

    return MathAnswer(extract="boxed")


def is_correct(completion: str, reference: str) -> bool:
    """The completion's last `\\boxed{}` answer equals the reference answer (a bare answer or a boxed solution)."""
    return _grader().score(completion, reference) == 1.0


# -- the reasoning set -----------------------------------------------------------------------------------------


def _answer_text(value: Any) -> str:
    """A reference answer as text: a list (OlympiadBench's final_answer) joined by ", ", a whole float as an
    integer (27.0 -> "27"), anything else as written."""
    if isinstance(value, list | tuple):
        return ", ".join(_answer_text(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _renamed(dataset, problem: str, answer: str):
    def convert(record: dict[str, Any]) -> dict[str, str]:
        return {"problem": str(record[problem]).strip(), "answer": _answer_text(record[answer])}

    return dataset.map(convert, remove_columns=dataset.column_names)


def math500_docs(dataset):
    """HuggingFaceH4/MATH-500: `problem`, `answer`."""
    return _renamed(dataset, "problem", "answer")


def amc23_docs(dataset):
    """math-ai/amc23: `question`, `answer` (a number)."""
    return _renamed(dataset, "question", "answer")


def minerva_docs(dataset):
    """math-ai/minervamath: `question`, `answer`."""
    return _renamed(dataset, "question", "answer")


def olympiadbench_docs(dataset):
    """math-ai/olympiadbench: `question`, `final_answer` (a list of LaTeX answers)."""
    return _renamed(dataset, "question", "final_answer")


def reasoning_prompt(doc: dict[str, str]) -> str:
    """The Tülu chat layout GRPO's prompts use (`TuluTemplate` with a generation prompt): encoded after BOS, as
    lm-eval's request is, these are the very token ids `TuluTemplate.encode` gives the same conversation."""
    return f"<|user|>\n{doc['problem']} {REASONING_INSTRUCTION}\n<|assistant|>\n"


def all_completions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: keep every sampled completion of each problem (lm-eval's default keeps the first)."""
    return [list(completions) for completions in resps]


def pass_at_1(doc: dict[str, str], results: list[list[str]]) -> dict[str, float]:
    """Mean correctness over the problem's sampled completions: an unbiased pass@1 estimate."""
    completions = results[0]
    return {"pass@1": sum(is_correct(c, doc["answer"]) for c in completions) / len(completions)}


# -- MATH, Minerva format --------------------------------------------------------------------------------------


def math_docs(dataset):
    """EleutherAI/hendrycks_math (one subject): `problem`, `solution` -> plus `answer`, the solution's last boxed
    answer (what a reply is graded against)."""
    from moxin_lightning.rewards import last_boxed

    def convert(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "answer": last_boxed(record["solution"]) or ""}

    return dataset.map(convert)


def math_exact(doc: dict[str, str], results: list[str]) -> dict[str, int]:
    """1 when the reply's last boxed answer equals the reference (math-verify beyond plain numbers), else 0."""
    return {"math_verify": int(is_correct(results[0], doc["answer"]))}


# -- PopQA ------------------------------------------------------------------------------------------------------


def popqa_answers(doc: dict[str, Any]) -> list[str]:
    """The question's possible answers: akariasai/PopQA stores them as a JSON list in a string."""
    value = doc["possible_answers"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    return [str(answer) for answer in (value if isinstance(value, list) else [value])]


def popqa_exact(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """1 when the reply contains one of the possible answers (case-insensitive, whitespace collapsed), else 0."""
    reply = _collapsed(results[0])
    return {"exact_match": int(any(_collapsed(answer) in reply for answer in popqa_answers(doc) if answer.strip()))}


def _collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()
