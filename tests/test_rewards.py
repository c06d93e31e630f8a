"""Rewards: answer extraction, exact and symbolic answer comparison, format, weighted combination, failing rewards,
and user rewards named by class_path."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from jsonargparse import ArgumentParser

from moxin_lightning.rewards import (
    CombinedReward,
    Format,
    FunctionReward,
    MathAnswer,
    Reward,
    ThinkThenAnswer,
    extract_answer,
    last_boxed,
    last_hash_answer,
)


class Brevity(Reward):
    """A user reward the YAML test selects by class_path: 1 for completions of at most `max_chars` characters."""

    def __init__(self, max_chars: int = 10) -> None:
        self.max_chars = max_chars

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [float(len(c) <= self.max_chars) for c in completions]


class FailsOnBang(Reward):
    """Raises on any batch holding a completion with '!' (so the batched call fails, then only those samples)."""

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        if any("!" in c for c in completions):
            raise RuntimeError("cannot score '!'")
        return [2.0] * len(completions)


def has_question_mark(completion: str, answer: str, prompt: str) -> float:
    return float("?" in prompt)


def score(reward: Reward, completions: list[str], answers: list[str]) -> list[float]:
    return reward(completions, answers, [""] * len(completions))


# ------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last one wins
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{ -3.5 }", "-3.5"),
        ("done \\boxed{7} then \\boxed{8", "7"),  # an unclosed box (cut off) is skipped
        ("\\fbox{9}", "9"),
        ("no box here", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1\nwait, redo\n#### 1,000  \n", "1,000"),  # the last line wins, spaces trimmed
        ("#### -2.5", "-2.5"),
        ("the #### is not at a line start 5", None),
        ("####\n", None),
        ("nothing", None),
    ],
)
def test_last_hash_answer(text: str, expected: str | None) -> None:
    assert last_hash_answer(text) == expected


def test_auto_extraction_takes_whichever_comes_last() -> None:
    assert extract_answer("#### 3\nso \\boxed{4}") == "4"
    assert extract_answer("\\boxed{4}\n#### 3") == "3"
    assert extract_answer("\\boxed{4}\n#### 3", "boxed") == "4"
    assert extract_answer("\\boxed{4}\n#### 3", "hash") == "3"
    assert extract_answer("#### 3\n\\boxed{4") == "3"  # the later box is unclosed: the hash line answers


# --------------------------------------------------------------------------------------------- math answers


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("#### 1,000", "1000", 1.0),  # thousands commas
        ("#### $1,234,567.", "1234567", 1.0),  # dollar sign and full stop
        ("#### -17", "-17", 1.0),
        ("#### -17", "17", 0.0),
        ("#### 3.50", "3.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # exact fractions
        ("\\boxed{-\\dfrac{3}{4}}", "-0.75", 1.0),
        ("#### 7/2", "3.5", 1.0),
        ("#### 0.333333", "\\frac{1}{3}", 0.0),  # plain numbers compare exactly
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # math-verify: symbolic
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
        ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
        ("#### 72", "Worked solution...\n#### 72", 1.0),  # a reference may be a whole GSM8K solution
        ("#### 73", "72", 0.0),
        ("the answer is 72", "72", 0.0),  # no final answer line: nothing to credit
        ("#### 72 apples", "72", 1.0),  # math-verify drops a trailing unit word
        ("#### 71 or 72", "72", 0.0),  # but hedging is a set, not the answer
    ],
)
def test_math_answer(completion: str, reference: str, expected: float) -> None:
    assert score(MathAnswer(), [completion], [reference]) == [expected]


def test_math_answer_accepts_numeric_references() -> None:
    """JSON records may hold the answer as a number."""
    assert MathAnswer()(["#### 72", "#### 0.5", "#### 2"], [72, 0.5, 3], ["", "", ""]) == [1.0, 1.0, 0.0]  # type: ignore[list-item]


def test_math_answer_extract_mode_restricts_where_the_answer_is_read() -> None:
    completions = ["\\boxed{5}", "#### 5"]
    assert score(MathAnswer(extract="boxed"), completions, ["5", "5"]) == [1.0, 0.0]
    assert score(MathAnswer(extract="hash"), completions, ["5", "5"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="MathAnswer\\(extract='box'\\) is unknown; use 'auto', 'boxed' or 'hash'"):
        MathAnswer(extract="box")  # type: ignore[arg-type]


def test_math_answer_gives_up_on_answers_too_costly_to_check() -> None:
    start = time.perf_counter()
    # sympy would work on this power tower for hours; math-verify's timeout stops it after timeout_s
    assert score(MathAnswer(timeout_s=1), ["\\boxed{9^{9^{9^{9}}}}"], ["5"]) == [0.0]
    assert time.perf_counter() - start < 5
    assert score(MathAnswer(max_answer_chars=8), ["#### 123456789"], ["123456789"]) == [0.0]
    assert score(MathAnswer(max_answer_chars=9), ["#### 123456789"], ["123456789"]) == [1.0]


def test_math_answer_outside_the_main_thread() -> None:
    """math-verify's SIGALRM timeout raises outside the main thread; the reward must turn it off there."""
    results: list[list[float]] = []
    worker = threading.Thread(
        target=lambda: results.append(score(MathAnswer(), ["\\boxed{\\sqrt{8}}", "\\boxed{3}"], ["2\\sqrt{2}", "4"]))
    )
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0]]


# ------------------------------------------------------------------------------------ DeepScaleR's think reward


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("<think>2 + 2 = 4</think> The answer is \\boxed{4}.", "4", 1.0),
        ("<think>2 + 2 = 4</think> The answer is \\boxed{5}.", "4", 0.0),  # wrong answer after </think>
        ("2 + 2 = 4, so the answer is \\boxed{4}.", "4", 0.0),  # never closes </think>: a format error
        ("<think>2 + 2 = 4, so \\boxed{4}", "4", 0.0),  # cut off inside the reasoning
        ("<think>so \\boxed{4}</think> That is all.", "4", 0.0),  # the answer only inside the reasoning
        ("<think>maybe \\boxed{5}</think> no: \\boxed{4}", "4", 1.0),  # a box in the reasoning is not read
        ("<think>maybe \\boxed{5}</think> no: \\boxed{4}", "5", 0.0),
        ("2 + 2 = 4</think>\n\\boxed{4}", "4", 1.0),  # DeepScaleR's prompt opened <think>: only the close counts
        ("<think>a</think> \\boxed{4} </think> \\boxed{5}", "4", 1.0),  # read up to a second </think> only
        ("<think>a</think> \\boxed{4} </think> \\boxed{5}", "5", 0.0),
        ("<think>a</think>\n#### 4", "4", 0.0),  # only a boxed answer counts
        ("<think>a</think>\n\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # exact fractions
        ("<think>a</think> \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # math-verify
        ("<think>a</think> \\boxed{4}", "so the total is \\boxed{4}", 1.0),  # a MATH solution as reference
        ("<think>a</think> \\boxed{4}", 4, 1.0),  # a number read from JSON
        ("", "4", 0.0),
    ],
)
def test_think_then_answer_grades_only_the_text_after_the_reasoning(completion, reference, expected) -> None:
    assert ThinkThenAnswer()([completion], [reference], [""]) == [expected]


def test_think_then_answer_can_require_the_opening_tag_too() -> None:
    completions = ["<think>2 + 2 = 4</think> \\boxed{4}", "2 + 2 = 4</think> \\boxed{4}", "</think><think> \\boxed{4}"]
    assert ThinkThenAnswer(require_open=True)(completions, ["4"] * 3, [""] * 3) == [1.0, 0.0, 0.0]
    # as DeepScaleR reads it: only the close matters, so the last one's answer "<think> \\boxed{4}" counts
    assert ThinkThenAnswer()(completions, ["4"] * 3, [""] * 3) == [1.0, 1.0, 1.0]
    reward = ThinkThenAnswer()
    assert (reward.name, reward.extract) == ("think_then_answer", "boxed")


# --------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "reward, completion, expected",
    [
        (Format(), "steps\n#### 4", 1.0),
        (Format(), "steps \\boxed{4} done", 1.0),
        (Format(), "the answer is 4", 0.0),
        (Format(answer="hash"), "#### 4\nbut also more text", 0.0),  # the answer line must be the last
        (Format(answer="hash"), "steps\n#### 4\n\n", 1.0),
        (Format(answer="hash"), "\\boxed{4}", 0.0),
        (Format(answer="boxed"), "\\boxed{4", 0.0),  # unclosed
        (Format(answer="boxed", think=True), "<think>hmm</think> so \\boxed{4}", 1.0),
        (Format(answer="boxed", think=True), "so \\boxed{4}", 0.0),
        (Format(pattern=r"<answer>\d+</answer>"), "  <answer>12</answer>\n", 1.0),
        (Format(pattern=r"<answer>\d+</answer>"), "<answer>12</answer> extra", 0.0),
    ],
)
def test_format(reward: Format, completion: str, expected: float) -> None:
    assert score(reward, [completion], [""]) == [expected]


# ---------------------------------------------------------------------------------------------- combination


def test_combined_reward_is_the_weighted_sum_per_sample() -> None:
    combined = CombinedReward([MathAnswer(), Format(answer="hash"), Brevity(max_chars=8)], [1.0, 0.25, -0.5])
    completions = ["#### 4", "\\boxed{4}", "long reasoning\n#### 5"]
    assert combined(completions, ["4", "4", "4"], ["", "", ""]) == [1.0 + 0.25 - 0.5, 1.0 - 0.0 - 0.0, 0.25]
    assert combined.last_scores == {
        "math_answer": [1.0, 1.0, 0.0],
        "format": [1.0, 0.0, 1.0],
        "brevity": [1.0, 0.0, 0.0],
    }
    assert combined.last_failures == {"math_answer": 0, "format": 0, "brevity": 0}


def test_combined_reward_defaults_to_unit_weights_and_unique_names() -> None:
    combined = CombinedReward([Format(answer="hash"), Format(answer="boxed")])
    assert combined(["#### 1", "\\boxed{1}"], ["1", "1"], ["", ""]) == [1.0, 1.0]
    assert list(combined.last_scores) == ["format", "format_2"]


def test_a_failing_reward_scores_zero_only_where_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    combined = CombinedReward([FailsOnBang(), Format(answer="hash")], [0.5, 1.0])
    completions = ["#### 1", "oops!\n#### 2", "#### 3", "! no answer"]
    with caplog.at_level(logging.WARNING, logger="moxin_lightning.rewards"):
        total = combined(completions, ["1"] * 4, [""] * 4)
    assert total == [2.0, 1.0, 2.0, 0.0]
    assert combined.last_scores["fails_on_bang"] == [2.0, 0.0, 2.0, 0.0]
    assert combined.last_failures == {"fails_on_bang": 2, "format": 0}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "reward 'fails_on_bang' failed on 2 of 4 samples, which score 0 for it; first error: RuntimeError: "
        "cannot score '!'"
    ]
    combined(["#### 1"], ["1"], [""])  # counts are per batch
    assert combined.last_failures == {"fails_on_bang": 0, "format": 0}


def test_wrong_length_or_non_finite_scores_count_as_failures() -> None:
    class Broken(Reward):
        def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
            return [float("nan") if c == "nan" else 1.0 for c in completions] + ([1.0] if len(completions) > 1 else [])

    combined = CombinedReward([Broken()])
    assert combined(["a", "nan", "b"], ["", "", ""], ["", "", ""]) == [1.0, 0.0, 1.0]
    assert combined.last_failures == {"broken": 1}


def test_combined_reward_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="^1 reward weights for 2 rewards; give one weight per reward$"):
        CombinedReward([MathAnswer(), Format()], [1.0])
    with pytest.raises(ValueError, match="needs at least one reward"):
        CombinedReward([])
    with pytest.raises(ValueError, match="got 2 completions, 1 answers and 2 prompts"):
        CombinedReward([Format()])(["a", "b"], ["x"], ["p", "q"])


def test_function_reward_wraps_a_per_sample_function() -> None:
    reward = FunctionReward(has_question_mark)
    assert reward.name == "has_question_mark"
    assert reward(["a", "b"], ["", ""], ["why?", "because"]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------- YAML


def test_rewards_are_chosen_by_class_path_in_yaml() -> None:
    parser = ArgumentParser()
    parser.add_argument("--rewards", type=list[Reward])
    parser.add_argument("--reward_weights", type=list[float])
    config = parser.parse_string(
        """
        rewards:
          - class_path: moxin_lightning.rewards.MathAnswer
            init_args: {extract: hash}
          - class_path: tests.test_rewards.Brevity
            init_args: {max_chars: 6}
          - class_path: moxin_lightning.rewards.FunctionReward
            init_args: {function: tests.test_rewards.has_question_mark}
          - class_path: moxin_lightning.rewards.ThinkThenAnswer
            init_args: {require_open: true}
        reward_weights: [1.0, 0.5, 2.0, 4.0]
        """
    )
    built = parser.instantiate(config)
    rewards = built.rewards
    assert [type(r) for r in rewards] == [MathAnswer, Brevity, FunctionReward, ThinkThenAnswer]
    assert rewards[0].extract == "hash" and rewards[1].max_chars == 6 and rewards[2].function is has_question_mark
    assert rewards[3].require_open is True
    combined = CombinedReward(rewards, built.reward_weights)
    completions = ["#### 3", "#### 4 is it", "<think>1 + 2</think>\\boxed{3}"]
    assert combined(completions, ["3", "3", "3"], ["why?", "no", "no"]) == [1.0 + 0.5 + 2.0, 0.0, 4.0]
