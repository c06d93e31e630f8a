"""Outcome rewards for GRPO: math answer correctness, DeepScaleR's think-then-answer reward, answer format, user
rewards, and their weighted sum.

A reward scores a batch of completions at once (`Reward.__call__(completions, answers, prompts) -> list[float]`),
so one that calls a model or a grader can batch its work. YAML names rewards by class_path, user classes included:

    model:
      rewards:
        - class_path: moxin_lightning.rewards.MathAnswer     # or ThinkThenAnswer: DeepScaleR's, after </think>
        - class_path: moxin_lightning.rewards.Format
          init_args: {answer: hash}
        - class_path: my_pkg.rewards.Brevity     # any Reward subclass
      reward_weights: [1.0, 0.1, 0.05]

Model output is text to parse, never code to run: answers are read from the last `\\boxed{...}` (balanced braces)
or the last `#### N` line. Plain numbers ("1,000", "-3.50", "7/2", "\\frac{1}{2}") are compared exactly as
fractions; anything else (LaTeX expressions, sets, intervals) goes to math-verify, with its SIGALRM timeout where
signals work (the main thread of a process: Lightning's training loop, DataLoader workers) and without one
elsewhere, because signal.alarm raises outside the main thread.

`CombinedReward` keeps training alive when a reward fails: a reward that raises on a batch is retried sample by
sample, and each sample it still fails on (an exception, a non-number or a non-finite value) scores 0 for that
reward. The failures are counted per reward (`last_failures`) and logged once per batch.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from typing import Literal

logger = logging.getLogger(__name__)

Extract = Literal["auto", "boxed", "hash"]

_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_DECIMAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_RATIO = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$")


class Reward:
    """A batched reward: one float per completion. Subclass it and implement `__call__`.

    `name` labels the reward in logs: the class name in snake_case unless a subclass or instance sets it.
    """

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return getattr(self, "_name", None) or re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    @name.setter
    def name(self, value: str) -> None:
        self._name = value


# ------------------------------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}`, braces balanced (`\\{` and `\\}` are literal); None if none.

    An unclosed `\\boxed{` (a completion cut at the length limit) is skipped, not read to the end of the text.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                return text[match.end() : i].strip()
            i += 1
    return None


def last_hash_answer(text: str) -> str | None:
    """What follows `####` on the last line that starts with it (GSM8K's convention); None if no such line."""
    found = _HASH_LINE.findall(text)
    return found[-1] if found and found[-1] else None


def extract_answer(text: str, extract: Extract = "auto") -> str | None:
    """The final answer in `text`: the boxed one, the `####` one, or (auto) whichever of the two comes last."""
    if extract == "boxed":
        return last_boxed(text)
    if extract == "hash":
        return last_hash_answer(text)
    boxed_at = max((m.start() for m in _BOXED.finditer(text)), default=-1)
    hash_at = max((m.start() for m in _HASH_LINE.finditer(text)), default=-1)
    first, second = (last_boxed, last_hash_answer) if boxed_at > hash_at else (last_hash_answer, last_boxed)
    return first(text) or second(text)


def _clean(answer: str) -> str:
    """Drop what only decorates a number: dollar signs, a trailing full stop, a leading '=', thousands commas."""
    answer = answer.replace("\\$", "").replace("$", "").strip()
    answer = answer.removeprefix("=").strip().rstrip(".").strip()
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return answer


def as_fraction(answer: str) -> Fraction | None:
    """The exact value of a plain number (integer, decimal, a/b, \\frac{a}{b}); None for anything else."""
    if _DECIMAL.match(answer):
        return Fraction(answer)
    if match := _RATIO.match(answer):
        numerator, denominator = int(match[1]), int(match[2])
        return Fraction(numerator, denominator) if denominator else None
    if match := _FRAC.match(answer):
        sign, numerator, denominator = match[1], int(match[2]), int(match[3])
        return (-1 if sign == "-" else 1) * Fraction(numerator, denominator) if denominator else None
    return None


# ------------------------------------------------------------------------------------------------------ rewards


def _signal_timeout(seconds: int) -> int | None:
    """math-verify's timeout uses SIGALRM, which Python only allows in a process's main thread."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    return seconds if seconds > 0 and in_main_thread and hasattr(signal, "SIGALRM") else None


@lru_cache(maxsize=4096)
def _parse_reference(answer: str, timeout: int | None) -> tuple:
    """Reference answers repeat G times per group: parse each once."""
    from math_verify import parse

    return tuple(parse(f"${answer}$", parsing_timeout=timeout))


class MathAnswer(Reward):
    """1.0 when the completion's final answer equals the reference answer, else 0.0 (also when none is found).

    Args:
        extract: where the completion's answer is: "boxed" (last `\\boxed{}`), "hash" (last `#### N` line) or
            "auto" (whichever of the two comes last).
        timeout_s: math-verify's time limit per parse and per comparison of non-numeric answers (a sympy
            simplification can run for hours), applied where signals work (see the module docstring).
        max_answer_chars: a longer extracted answer scores 0 unparsed: no real final answer is that long, and
            parsing a huge one would stall the step.
    """

    def __init__(self, extract: Extract = "auto", timeout_s: int = 5, max_answer_chars: int = 500) -> None:
        if extract not in ("auto", "boxed", "hash"):
            raise ValueError(f"MathAnswer(extract={extract!r}) is unknown; use 'auto', 'boxed' or 'hash'")
        self.extract = extract
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [self.score(completion, answer) for completion, answer in zip(completions, answers, strict=True)]

    def score(self, completion: str, reference: str | int | float) -> float:
        predicted = extract_answer(completion, self.extract)
        if predicted is None or len(predicted) > self.max_answer_chars:
            return 0.0
        # A reference may be a bare answer ("72"), a number read from JSON, or a worked solution that ends in one.
        reference = str(reference)
        reference = extract_answer(reference) or reference
        predicted, reference = _clean(predicted), _clean(reference)
        exact_prediction, exact_reference = as_fraction(predicted), as_fraction(reference)
        if exact_prediction is not None and exact_reference is not None:
            return float(exact_prediction == exact_reference)
        return float(self._verify(predicted, reference))

    def _verify(self, predicted: str, reference: str) -> bool:
        from math_verify import parse, verify

        timeout = _signal_timeout(self.timeout_s)
        gold = _parse_reference(reference, timeout)
        guess = parse(f"${predicted}$", parsing_timeout=timeout)
        return bool(gold and guess and verify(list(gold), guess, timeout_seconds=timeout))


class ThinkThenAnswer(MathAnswer):
    """DeepScaleR's outcome reward (what Moxin-Reasoning's GRPO ran): 1.0 when the completion closes its reasoning
    with `</think>` and the `\\boxed{}` answer written after it equals the reference answer, else 0.0.

    As agentica-project/deepscaler's `deepscaler/rewards/math_reward.py` grades a response:
    - no `</think>` in the completion scores 0 (a reasoning cut off by the length limit never reaches an answer);
    - the answer is read from the text after the first `</think>` only (up to a second `</think>`, if the model
      writes one), so an answer boxed inside the reasoning earns nothing;
    - only a `\\boxed{}` answer counts, compared with the reference as `MathAnswer` does (exact for plain numbers,
      math-verify for the rest; a boxed reference, e.g. a MATH solution, gives its boxed answer).
    DeepScaleR's prompt template opens the `<think>` block itself, so the completion need not: `require_open`
    also asks the completion to contain `<think>` before its `</think>`.

    Args:
        require_open: score 0 unless `<think>` comes before the first `</think>`.
        timeout_s, max_answer_chars: as for `MathAnswer`.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, require_open: bool = False, timeout_s: int = 5, max_answer_chars: int = 500) -> None:
        super().__init__(extract="boxed", timeout_s=timeout_s, max_answer_chars=max_answer_chars)
        self.require_open = require_open

    def score(self, completion: str, reference: str | int | float) -> float:
        thought, closed, after = completion.partition(self.CLOSE)
        if not closed or (self.require_open and self.OPEN not in thought):
            return 0.0
        answer_part = after.partition(self.CLOSE)[0]
        return super().score(answer_part, reference)


class Format(Reward):
    """1.0 when the completion has the expected shape, else 0.0.

    Args:
        answer: "hash": the last non-empty line is `#### <answer>`; "boxed": a complete `\\boxed{...}` is present;
            "either": one of the two.
        think: also require the completion to open with a `<think>...</think>` block.
        pattern: a regular expression the whole (stripped) completion must match instead (`re.DOTALL`);
            `answer` and `think` are then ignored.
    """

    def __init__(
        self, answer: Literal["hash", "boxed", "either"] = "either", think: bool = False, pattern: str | None = None
    ) -> None:
        if answer not in ("hash", "boxed", "either"):
            raise ValueError(f"Format(answer={answer!r}) is unknown; use 'hash', 'boxed' or 'either'")
        self.answer = answer
        self.think = think
        self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [float(self.matches(completion)) for completion in completions]

    def matches(self, completion: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(completion.strip()) is not None
        if self.think and not _THINK.match(completion):
            return False
        lines = completion.strip().splitlines()
        ends_with_hash = bool(lines) and last_hash_answer(lines[-1]) is not None
        has_boxed = last_boxed(completion) is not None
        return {"hash": ends_with_hash, "boxed": has_boxed, "either": ends_with_hash or has_boxed}[self.answer]


class FunctionReward(Reward):
    """A per-sample function `f(completion, answer, prompt) -> float`, named in YAML by its import path.

    - class_path: moxin_lightning.rewards.FunctionReward
      init_args: {function: my_pkg.rewards.brevity}
    """

    def __init__(self, function: Callable[[str, str, str], float], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", "function")

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [float(self.function(c, a, p)) for c, a, p in zip(completions, answers, prompts, strict=True)]


class CombinedReward(Reward):
    """The weighted sum of several rewards, per sample; a failing reward scores 0 where it fails (and is counted).

    `last_scores` holds each reward's scores of the last batch and `last_failures` how many samples each failed
    on, keyed by the rewards' names (made unique with a numeric suffix: "format", "format_2").
    """

    name = "reward"

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None) -> None:
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward; list them under `rewards:`")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"{len(weights)} reward weights for {len(rewards)} rewards; give one weight per reward")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights must be finite numbers, got {weights}")
        self.rewards = list(rewards)
        self.weights = weights
        self.labels = _unique([getattr(reward, "name", None) or type(reward).__name__ for reward in rewards])
        self.last_scores: dict[str, list[float]] = {}
        self.last_failures: dict[str, int] = {}

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        if not len(completions) == len(answers) == len(prompts):
            raise ValueError(
                f"rewards need one answer and one prompt per completion, got {len(completions)} completions, "
                f"{len(answers)} answers and {len(prompts)} prompts"
            )
        self.last_scores, self.last_failures = {}, {}
        total = [0.0] * len(completions)
        for reward, weight, label in zip(self.rewards, self.weights, self.labels, strict=True):
            scores, failures = _score_safely(reward, label, completions, answers, prompts)
            self.last_scores[label], self.last_failures[label] = scores, failures
            total = [t + weight * s for t, s in zip(total, scores, strict=True)]
        return total


def _score_safely(
    reward: Reward, label: str, completions: list[str], answers: list[str], prompts: list[str]
) -> tuple[list[float], int]:
    """The reward's scores, batched if that works, else sample by sample with 0 for each sample that fails."""
    try:
        return _checked(reward(completions, answers, prompts), len(completions)), 0
    except Exception:  # noqa: BLE001 - a user reward may raise anything; the per-sample pass reports it
        pass
    scores, failures, first_error = [], 0, None
    for completion, answer, prompt in zip(completions, answers, prompts, strict=True):
        try:
            (score,) = _checked(reward([completion], [answer], [prompt]), 1)
        except Exception as error:  # noqa: BLE001
            score, failures = 0.0, failures + 1
            first_error = first_error or error
        scores.append(score)
    if failures:
        logger.warning(
            "reward %r failed on %d of %d samples, which score 0 for it; first error: %s: %s",
            label,
            failures,
            len(completions),
            type(first_error).__name__,
            first_error,
        )
    return scores, failures


def _checked(scores: object, expected: int) -> list[float]:
    """Scores as floats, or an error if they are not `expected` finite numbers."""
    values = [float(score) for score in scores]  # type: ignore[attr-defined]
    if len(values) != expected:
        raise ValueError(f"returned {len(values)} scores for {expected} completions")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"returned a non-finite score: {values}")
    return values


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return unique
