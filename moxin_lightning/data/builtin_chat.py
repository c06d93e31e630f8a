"""Real chat data every Python installation has, so supervised fine-tuning (and DPO) run with nothing downloaded.

Records are in Tülu 3 form (`{"messages": [{"role": ..., "content": ...}, ...]}`) and deterministic for a given
interpreter and seed. A `ChatData` entry names them as `builtin-chat:<name>[?count=N&seed=S]`:

* `pydoc`: the Python language reference sections that `help()` shows (`pydoc_data.topics.topics`), one
  conversation per section: the user asks about the section (phrasing drawn from a seeded generator), the assistant
  answers with the section's text, cut at a paragraph boundary near `ANSWER_CHARS`. Some conversations open with
  a system prompt; some continue with a follow-up question about the next section of the same topic.
* `arithmetic`: GSM8K-style word problems made procedurally, answered with a worked solution, one step per line,
  ending in `#### <answer>` (GSM8K's convention). Problem `i` of seed `s` is `arithmetic_problem((s << 32) + i)`.
* `arithmetic_think`: the same problems in the form of reasoning data (OpenR1-Math-220k, DeepSeek-R1): the user
  asks with DeepScaleR's instruction (`BOXED_INSTRUCTION`), the assistant works the steps inside
  `<think>...</think>`, then states the final answer in `\\boxed{}` (`think_solution`).

`builtin-prompts:arithmetic_think` asks the same kind of problems (other seeds) with that instruction, for GRPO
with `rewards.ThinkThenAnswer`.

For preference data, `wrong_solution(seed)` works the same problem as `arithmetic_problem(seed)` with one
arithmetic slip, carried through the later steps to a wrong final answer: a correct and a wrong solution make
a (chosen, rejected) pair.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from moxin_lightning.atomic import written_file
from moxin_lightning.data.sources import DataError

PREFIX = "builtin-chat:"
NAMES = ("pydoc", "arithmetic", "arithmetic_think")
DEFAULT_ARITHMETIC_COUNT = 1000
ANSWER_CHARS = 1500  # a reply stops at the last paragraph boundary before this (but keeps its first paragraph)
_UNDERLINE = re.compile(r"([=*\-~^])\1{2,}")


# ----------------------------------------------------------------------------------------------- entry points


def parse_spec(spec: str) -> tuple[str, int | None, int]:
    """'builtin-chat:arithmetic?count=50&seed=3' -> ('arithmetic', 50, 3); DataError on anything else."""
    name, _, query = spec.removeprefix(PREFIX).partition("?")
    if name not in NAMES:
        choices = ", ".join(PREFIX + n for n in NAMES)
        raise DataError(f"unknown {spec}: the built-in chat corpora are {choices}")
    options = {"count": None, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise DataError(f"unknown option {key!r} in {spec}: use count=<N> and/or seed=<S>")
        if not value.isdigit():
            raise DataError(f"{key}={value!r} in {spec} is not a non-negative integer")
        options[key] = int(value)
    return name, options["count"], options["seed"]


def chat_records(name: str, count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The records of corpus `name`: at most `count` of them (None: every pydoc section, or
    `DEFAULT_ARITHMETIC_COUNT` problems), the same ones for the same (name, count, seed)."""
    if name == "pydoc":
        records = pydoc_records(seed)
        yield from (records if count is None else records[:count])
    elif name in ("arithmetic", "arithmetic_think"):
        solve = arithmetic_problem if name == "arithmetic" else think_solution
        for index in range(DEFAULT_ARITHMETIC_COUNT if count is None else count):
            question, solution, _ = solve((seed << 32) + index)
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]}
    else:
        raise DataError(f"unknown built-in chat corpus {name!r}; choose one of: {', '.join(NAMES)}")


def records_of(spec: str) -> Iterator[dict[str, Any]]:
    """The records a `builtin-chat:` entry names."""
    return chat_records(*parse_spec(spec))


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines to a temporary sibling, renamed to `path` once complete."""
    path = Path(path)
    with written_file(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- pydoc topics

SYSTEM_PROMPTS = (
    "You are a helpful assistant who explains the Python language precisely.",
    "You are an expert Python programmer. Answer with the language reference in mind.",
)
QUESTIONS = (
    "Explain {title} in Python.",
    "What does the Python language reference say about {title}?",
    "Can you describe {title} in Python?",
    "How does {title} work in Python?",
    "I am learning Python. Could you explain {title} to me?",
)
FOLLOW_UPS = ("And what about {title}?", "Thanks. Now explain {title}.", "What about {title}?")


@dataclass(frozen=True)
class Section:
    """One titled section of a pydoc topic; `title` names it within its topic (e.g. 'Lists (Sequence Types)')."""

    topic: str
    title: str
    body: str


def pydoc_sections() -> list[Section]:
    """Every titled section of every pydoc topic with a non-empty body, by topic key then order in the topic."""
    from pydoc_data.topics import topics

    sections = []
    for key in sorted(topics):
        lines = topics[key].split("\n")
        heads = [i - 1 for i in range(1, len(lines)) if _is_underline(lines[i], lines[i - 1])]
        topic_title = lines[heads[0]].strip() if heads else key
        for number, head in enumerate(heads):
            end = heads[number + 1] if number + 1 < len(heads) else len(lines)
            body = "\n".join(lines[head + 2 : end]).strip()
            title = lines[head].strip()
            if body:
                named = title if number == 0 else f"{title} ({topic_title})"
                sections.append(Section(key, named, body))
    return sections


def _is_underline(line: str, above: str) -> bool:
    return bool(_UNDERLINE.fullmatch(line)) and len(line) == len(above) and bool(above.strip())


def trimmed(text: str, limit: int = ANSWER_CHARS) -> str:
    """`text` cut at the last paragraph boundary before `limit` characters; always its first paragraph."""
    paragraphs = text.split("\n\n")
    kept = [paragraphs[0]]
    for paragraph in paragraphs[1:]:
        if len("\n\n".join([*kept, paragraph])) > limit:
            break
        kept.append(paragraph)
    return "\n\n".join(kept).strip()


def pydoc_records(seed: int = 0) -> list[dict[str, Any]]:
    """One conversation per pydoc section (see the module docstring)."""
    rng = random.Random(f"pydoc:{seed}")
    sections = pydoc_sections()
    records = []
    for index, section in enumerate(sections):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(title=section.title)})
        messages.append({"role": "assistant", "content": trimmed(section.body)})
        following = sections[index + 1] if index + 1 < len(sections) else None
        if following is not None and following.topic == section.topic and rng.random() < 0.3:
            messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS).format(title=following.title)})
            messages.append({"role": "assistant", "content": trimmed(following.body)})
        records.append({"messages": messages})
    return records


# ------------------------------------------------------------------------------------------ arithmetic problems

NAMES_AND_PRONOUNS = (
    ("Ava", "she"),
    ("Liam", "he"),
    ("Maya", "she"),
    ("Noah", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Ines", "she"),
    ("Kenji", "he"),
)
ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards")
GOODS = ("notebooks", "pens", "mugs", "books", "plants", "candles")
THINGS = ("bicycle", "video game", "pair of shoes", "jacket", "guitar")

Operand = int | str  # a number, or the name of an earlier step's result


@dataclass(frozen=True)
class Step:
    """`name = left op right`, explained by `text` (a format string over {left}, {right} and {result})."""

    name: str
    left: Operand
    op: str
    right: Operand
    text: str


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[Step, ...]

    def work(self, slip: tuple[int, int] | None = None) -> tuple[str, int]:
        """The worked solution and its answer; `slip=(step, error)` adds `error` to that step's result, as a
        student's mistake would, and carries the wrong value through the later steps."""
        values: dict[str, int] = {}
        lines = []
        for index, step in enumerate(self.steps):
            left, right = (values[o] if isinstance(o, str) else o for o in (step.left, step.right))
            result = _OPS[step.op](left, right)
            if slip is not None and slip[0] == index:
                result += slip[1]
            values[step.name] = result
            lines.append(step.text.format(left=left, right=right, result=result, op=step.op))
        answer = values[self.steps[-1].name]
        return "\n".join([*lines, f"#### {answer}"]), answer


_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _rng(seed_or_rng: int | random.Random) -> random.Random:
    return seed_or_rng if isinstance(seed_or_rng, random.Random) else random.Random(seed_or_rng)


def make_problem(seed_or_rng: int | random.Random) -> Problem:
    """A word problem drawn from one of the templates below; the same int seed gives the same problem."""
    rng = _rng(seed_or_rng)
    return rng.choice(_TEMPLATES)(rng)


def arithmetic_problem(seed_or_rng: int | random.Random) -> tuple[str, str, int]:
    """(question, correct worked solution ending in '#### <answer>', answer)."""
    problem = make_problem(seed_or_rng)
    solution, answer = problem.work()
    return problem.question, solution, answer


# DeepScaleR's instruction, appended to each problem (agentica-project/deepscaler scripts/data/deepscaler_dataset.py)
BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def think_solution(seed_or_rng: int | random.Random) -> tuple[str, str, int]:
    """(question + " " + `BOXED_INSTRUCTION`, reply, answer) for the problem `arithmetic_problem` makes from the
    same seed. The reply is reasoning data's form: the worked steps inside `<think>...</think>`, then the final
    answer in `\\boxed{}`, the form `rewards.ThinkThenAnswer` grades. With the local tokenizer a reply is at most
    120 tokens, within conf/grpo-local.yaml's 128-token responses."""
    problem = make_problem(seed_or_rng)
    solution, answer = problem.work()
    steps = solution.rpartition("\n")[0]  # the worked lines, without GSM8K's "#### N"
    reply = f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{{answer}}}."
    return f"{problem.question} {BOXED_INSTRUCTION}", reply, answer


def wrong_solution(seed_or_rng: int | random.Random) -> tuple[str, int]:
    """(worked solution with one arithmetic slip, its wrong answer) for the problem `arithmetic_problem` makes from
    the same int seed. The slip keeps every value non-negative and always changes the final answer (the steps
    only add, subtract and multiply by non-zero numbers, so an error never cancels out).

    Given a `random.Random` instead, the problem and then the slip are drawn from it: pass an int seed to pair a
    wrong solution with its correct one."""
    if isinstance(seed_or_rng, random.Random):
        problem, slip_rng = make_problem(seed_or_rng), seed_or_rng
    else:
        problem, slip_rng = make_problem(seed_or_rng), random.Random(f"slip:{seed_or_rng}")
    _, correct = problem.work()
    candidates = [
        (index, error)
        for index in range(len(problem.steps))
        for error in (-10, -2, -1, 1, 2, 10)
        if _plausible(problem, (index, error), correct)
    ]
    solution, answer = problem.work(slip_rng.choice(candidates))
    return solution, answer


def _plausible(problem: Problem, slip: tuple[int, int], correct: int) -> bool:
    """A slip that leaves every intermediate value non-negative and the answer wrong."""
    values: dict[str, int] = {}
    for index, step in enumerate(problem.steps):
        left, right = (values[o] if isinstance(o, str) else o for o in (step.left, step.right))
        values[step.name] = _OPS[step.op](left, right) + (slip[1] if index == slip[0] else 0)
        if values[step.name] < 0:
            return False
    return values[problem.steps[-1].name] != correct


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES_AND_PRONOUNS)


def _collecting(rng: random.Random) -> Problem:
    (name, he), item = _person(rng), rng.choice(ITEMS)
    have, packs, per_pack = rng.randint(5, 60), rng.randint(2, 9), rng.randint(3, 12)
    given = rng.randint(1, have + packs * per_pack - 1)
    question = (
        f"{name} has {have} {item}. {he.capitalize()} buys {packs} packs with {per_pack} {item} in each pack, "
        f"then gives {given} {item} to a friend. How many {item} does {name} have now?"
    )
    had = f"With the {{left}} {item} {he} had, that makes {{left}} + {{right}} = {{result}}."
    kept = f"After giving away {{right}}, {he} has {{left}} - {{right}} = {{result}} {item}."
    return Problem(
        question,
        (
            Step("bought", packs, "*", per_pack, f"{name} buys {{left}} * {{right}} = {{result}} {item}."),
            Step("total", have, "+", "bought", had),
            Step("left", "total", "-", given, kept),
        ),
    )


def _change(rng: random.Random) -> Problem:
    (name, he), good = _person(rng), rng.choice(GOODS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    bill = next(b for b in (20, 50, 100, 200) if b > count * price)
    question = (
        f"{name} buys {count} {good} that cost ${price} each and pays with a ${bill} bill. "
        f"How much change does {he} get, in dollars?"
    )
    return Problem(
        question,
        (
            Step("cost", count, "*", price, f"The {good} cost {{left}} * {{right}} = ${{result}}."),
            Step("change", bill, "-", "cost", "The change is {left} - {right} = ${result}."),
        ),
    )


def _reading(rng: random.Random) -> Problem:
    (name, he), monday, fewer = _person(rng), rng.randint(5, 40), rng.randint(1, 9)
    question = (
        f"{name} reads {monday} pages on Monday and twice as many pages on Tuesday. On Wednesday {he} reads "
        f"{fewer} pages fewer than on Tuesday. How many pages does {name} read over the three days?"
    )
    return Problem(
        question,
        (
            Step("tuesday", monday, "*", 2, "On Tuesday: {left} * {right} = {result} pages."),
            Step("wednesday", "tuesday", "-", fewer, "On Wednesday: {left} - {right} = {result} pages."),
            Step("two_days", monday, "+", "tuesday", "Monday and Tuesday together: {left} + {right} = {result} pages."),
            Step("total", "two_days", "+", "wednesday", "All three days: {left} + {right} = {result} pages."),
        ),
    )


def _savings(rng: random.Random) -> Problem:
    (name, he), thing = _person(rng), rng.choice(THINGS)
    weekly, weeks = rng.randint(3, 25), rng.randint(4, 20)
    price = rng.randint(10, weekly * weeks - 1)
    question = (
        f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${price} on a {thing}. "
        f"How many dollars does {he} have left?"
    )
    return Problem(
        question,
        (
            Step("saved", weekly, "*", weeks, f"{name} saves {{left}} * {{right}} = ${{result}}."),
            Step("left", "saved", "-", price, f"After buying the {thing}: {{left}} - {{right}} = ${{result}}."),
        ),
    )


def _bakery(rng: random.Random) -> Problem:
    trays, per_tray = rng.randint(3, 12), rng.randint(6, 24)
    baked = trays * per_tray
    morning = rng.randint(1, baked - 2)
    afternoon = rng.randint(0, baked - morning - 2)  # at least 2 left: "1 muffins" reads badly
    question = (
        f"A bakery bakes {trays} trays of muffins with {per_tray} muffins on each tray. It sells {morning} "
        f"muffins in the morning and {afternoon} in the afternoon. How many muffins are left?"
    )
    return Problem(
        question,
        (
            Step("baked", trays, "*", per_tray, "The bakery bakes {left} * {right} = {result} muffins."),
            Step("sold", morning, "+", afternoon, "It sells {left} + {right} = {result} muffins."),
            Step("left", "baked", "-", "sold", "Left over: {left} - {right} = {result} muffins."),
        ),
    )


def _orchard(rng: random.Random) -> Problem:
    rows, per_row = rng.randint(3, 15), rng.randint(4, 20)
    died, fruit = rng.randint(1, rows * per_row - 1), rng.randint(2, 30)
    question = (
        f"A farmer plants {rows} rows of apple trees with {per_row} trees in each row. {died} trees do not "
        f"survive the winter, and each remaining tree gives {fruit} apples. How many apples does the farmer get?"
    )
    return Problem(
        question,
        (
            Step("planted", rows, "*", per_row, "The farmer plants {left} * {right} = {result} trees."),
            Step("alive", "planted", "-", died, "{left} - {right} = {result} trees survive."),
            Step("apples", "alive", "*", fruit, "They give {left} * {right} = {result} apples."),
        ),
    )


_TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _collecting,
    _change,
    _reading,
    _savings,
    _bakery,
    _orchard,
)


# ------------------------------------------------------------------------------------------------- GRPO prompts

PROMPTS_PREFIX = "builtin-prompts:"
PROMPT_NAMES = ("arithmetic", "arithmetic_think", "gsm_symbolic")
ANSWER_INSTRUCTION = 'Solve it step by step, then give the final answer on a last line of the form "#### <answer>".'


def parse_prompt_spec(spec: str) -> tuple[str, int | None, int]:
    """'builtin-prompts:arithmetic?count=50&seed=3' -> ('arithmetic', 50, 3); DataError on anything else."""
    name, _, query = spec.removeprefix(PROMPTS_PREFIX).partition("?")
    if name not in PROMPT_NAMES:
        choices = ", ".join(PROMPTS_PREFIX + n for n in PROMPT_NAMES)
        raise DataError(f"unknown {spec}: the built-in prompts are {choices}")
    options: dict[str, int | None] = {"count": None, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise DataError(f"unknown option {key!r} in {spec}: use count=<N> and/or seed=<S>")
        if not value.isdigit():
            raise DataError(f"{key}={value!r} in {spec} is not a non-negative integer")
        options[key] = int(value)
    return name, options["count"], int(options["seed"] or 0)


def prompt_records(name: str = "arithmetic", count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Prompts with reference answers for reinforcement learning on outcomes (GRPO), nothing downloaded.

    Prompt i of seed s is the question of `arithmetic_problem((s << 32) + i)` (the problem builtin-chat:arithmetic
    solves for the same i and s) followed by `ANSWER_INSTRUCTION`, which asks for GSM8K's final-line convention the
    math reward reads; its answer is the problem's integer result, as text. `arithmetic_think` asks the same
    problem with DeepScaleR's `BOXED_INSTRUCTION` instead (the prompt of builtin-chat:arithmetic_think)."""
    if name not in PROMPT_NAMES:
        raise DataError(f"unknown built-in prompts {name!r}; choose one of: {', '.join(PROMPT_NAMES)}")
    if name == "gsm_symbolic":
        yield from _gsm_symbolic(DEFAULT_ARITHMETIC_COUNT if count is None else count, seed)
        return
    for index in range(DEFAULT_ARITHMETIC_COUNT if count is None else count):
        if name == "arithmetic_think":
            prompt, _, answer = think_solution((seed << 32) + index)
        else:
            question, _, answer = arithmetic_problem((seed << 32) + index)
            prompt = f"{question}\n{ANSWER_INSTRUCTION}"
        yield {"prompt": prompt, "answer": str(answer)}


def _gsm_symbolic(count: int, seed: int) -> Iterator[dict[str, Any]]:
    """reasoning-gym's `gsm_symbolic`: problems made from 100 GSM8K templates with fresh numbers, generated
    locally (no download); the `reasoning` extra installs it."""
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(
            "builtin-prompts:gsm_symbolic needs reasoning-gym: pip install 'moxin_lightning[reasoning]'"
        ) from None
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed):
        yield {"prompt": f"{item['question']}\n{ANSWER_INSTRUCTION}", "answer": str(item["answer"])}


def prompt_records_of(spec: str) -> Iterator[dict[str, Any]]:
    """The records a `builtin-prompts:` entry names."""
    return prompt_records(*parse_prompt_spec(spec))
