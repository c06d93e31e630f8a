"""Reasoning SFT data (conf/reasoning-sft.yaml): OpenThoughts-114k's ShareGPT shape (`system` + `conversations`
of {from, value}) and OpenR1-Math-220k's columns (its `messages` among problem, solution, generations, ...) read
through ChatData as the conversations they hold, in records of their publishers' shapes; the built-in think-form
chat and prompts of the local chain."""

from __future__ import annotations

import json

import pytest

from moxin_lightning.data import read_manifest
from moxin_lightning.data.builtin_chat import (
    BOXED_INSTRUCTION,
    arithmetic_problem,
    chat_records,
    prompt_records,
    think_solution,
)
from moxin_lightning.data.chat_records import BAD_MESSAGES, NO_ASSISTANT, UNKNOWN_ROLE, ChatFormat
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.records import encode_conversations, template_fingerprint
from moxin_lightning.data.sources import DataError
from moxin_lightning.datamodules.chat import ChatData
from moxin_lightning.rewards import Format, ThinkThenAnswer
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.test_chat_data import cache, chat_data, items  # noqa: F401  (cache: this module's own $MOXIN_CACHE)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    """A 500-piece BPE trained in a few milliseconds on the built-in think-form chat and the template's headers."""
    texts = [m["content"] for r in chat_records("arithmetic_think", count=200) for m in r["messages"]]
    texts += ["<|system|>\n<|user|>\n<|assistant|>\n<|begin_of_thought|><|end_of_thought|>"] * 20
    folder = train_tokenizer(iter(texts), 500, tmp_path_factory.mktemp("tokenizer"), progress=False, minloglevel=2)
    return SentencePieceTokenizer(folder)


# A stand-in for OpenThoughts' system prompt, which asks for its thought and solution sections
SYSTEM = (
    "Reason about the question at length first, inside <|begin_of_thought|> <|end_of_thought|>, then give the "
    "final solution inside <|begin_of_solution|> <|end_of_solution|>."
)


def openthoughts_row(question: str, thought: str, solution: str) -> dict:
    """A row of open-thoughts/OpenThoughts-114k (default config): `system`, `conversations` [{from, value}]."""
    reply = (
        f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{solution}\n\n"
        "<|end_of_solution|>"
    )
    return {
        "system": SYSTEM,
        "conversations": [
            {"from": "user", "value": f"Return your final response within \\boxed{{}}. {question}"},
            {"from": "assistant", "value": reply},
        ],
    }


def openr1_row(index: int) -> dict:
    """A row of open-r1/OpenR1-Math-220k (default split): the problem, its reference solution and answer, several
    generations with their checks, and `messages` (the problem and one generation)."""
    problem = f"Find x if x - {index} = 4."
    generations = [f"<think>\nAdd {index} to both sides.\n</think>\n\nSo $x = \\boxed{{{index + 4}}}$.", "<think>\nHm"]
    return {
        "problem": problem,
        "solution": f"Adding {index}: $x = {index + 4}$.",
        "answer": str(index + 4),
        "problem_type": "Algebra",
        "question_type": "math-word-problem",
        "source": "olympiads",
        "uuid": f"00000000-0000-0000-0000-{index:012d}",
        "is_reasoning_complete": [True, False],
        "generations": generations,
        "correctness_math_verify": [True, False],
        "correctness_llama": None,
        "finish_reasons": None,
        "correctness_count": 1,
        "messages": [{"content": problem, "role": "user"}, {"content": generations[0], "role": "assistant"}],
    }


def as_messages(row: dict) -> list[dict[str, str]]:
    """The conversation a row holds, as ChatData should read it."""
    if "messages" in row:
        return row["messages"]
    roles = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
    turns = [{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]
    return [{"role": "system", "content": row["system"]}, *turns]


def write_parquet(path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def encoded(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return encoded_messages(tokenizer, [as_messages(row) for row in rows])


def encoded_messages(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    pairs = encode_conversations(TuluTemplate(), tokenizer, conversations)
    return [(ids.tolist(), trained.astype(int).tolist()) for ids, trained in pairs]


def item_pairs(data) -> list[tuple[list[int], list[int]]]:
    return [(item["ids"].tolist(), item["trained"].tolist()) for item in items(data)]


OPENTHOUGHTS = [
    openthoughts_row(f"What is {i} + 3?", f"{i} plus 3 is {i + 3}.", f"\\boxed{{{i + 3}}}") for i in range(5)
]


def test_openthoughts_rows_are_read_as_system_user_assistant_conversations(tokenizer, tmp_path):
    parquet = write_parquet(tmp_path / "train-00000-of-00001.parquet", OPENTHOUGHTS)
    jsonl = tmp_path / "openthoughts.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in OPENTHOUGHTS))
    from_parquet = chat_data([parquet], tokenizer, max_length=512, shuffle=False)
    assert item_pairs(from_parquet) == encoded(tokenizer, OPENTHOUGHTS)
    assert item_pairs(chat_data([str(jsonl)], tokenizer, max_length=512, shuffle=False)) == item_pairs(from_parquet)
    assert from_parquet.skipped["train"] == {}
    # the reply is trained on as written, its thought and solution sections included
    first = from_parquet.streams["train"][0]
    reply = [token for token, trained in zip(first["ids"], first["trained"], strict=True) if trained]
    assert tokenizer.decode(reply[:-1]) == OPENTHOUGHTS[0]["conversations"][1]["value"]


def test_openr1_math_rows_are_read_from_their_messages_column_alone(tokenizer, tmp_path):
    rows = [openr1_row(i) for i in range(4)]
    parquet = write_parquet(tmp_path / "default-00000-of-00010.parquet", rows)
    fmt = ChatFormat(tokenizer, TuluTemplate(), 512)
    assert [set(record.value) for record in fmt.read(parquet)] == [{"messages"}] * 4  # not the generations
    data = chat_data([parquet], tokenizer, max_length=512, shuffle=False)
    assert item_pairs(data) == encoded(tokenizer, rows)
    # both datasets prepared together, as conf/reasoning-sft.yaml's data folder is
    openthoughts = write_parquet(tmp_path / "openthoughts.parquet", OPENTHOUGHTS)
    both = chat_data([openthoughts, parquet], tokenizer, max_length=512, shuffle=False)
    assert item_pairs(both) == encoded(tokenizer, OPENTHOUGHTS + rows)
    assert [set(record.value) for record in fmt.read(openthoughts)] == [{"conversations", "system"}] * 5


def test_a_parquet_file_with_neither_messages_nor_conversations_is_a_one_line_error(tokenizer, tmp_path):
    parquet = write_parquet(tmp_path / "numina.parquet", [{"problem": "1 + 1?", "answer": "2"}])
    message = (
        r"numina.parquet has no column 'messages' \(columns: problem, answer\); chat records need one, or "
        r"ShareGPT's 'conversations'$"
    )
    with pytest.raises(DataError, match=message):
        chat_data([parquet], tokenizer)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (  # ShareGPT's own speaker names; an empty system string adds no turn
            {"system": "", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        ),
        (  # no system field at all; a system turn inside the conversation
            {"conversations": [{"from": "system", "value": "Be brief."}, *OPENTHOUGHTS[0]["conversations"]]},
            [{"role": "system", "content": "Be brief."}, *as_messages(OPENTHOUGHTS[0])[1:]],
        ),
        (  # messages win over conversations
            {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}], **OPENTHOUGHTS[0]},
            [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
        ),
        ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "tool", "value": "x"}]}, UNKNOWN_ROLE),
        ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": None}]}, BAD_MESSAGES),
        ({"conversations": [{"from": "user", "value": "Hi"}, "Hello"]}, BAD_MESSAGES),
        ({"conversations": "Hi"}, BAD_MESSAGES),
        ({"system": 5, "conversations": OPENTHOUGHTS[0]["conversations"]}, BAD_MESSAGES),
        ({"conversations": [{"from": "user", "value": "Anyone?"}]}, NO_ASSISTANT),
    ],
)
def test_sharegpt_records_map_to_messages_or_are_skipped_with_a_reason(tokenizer, record, expected):
    assert ChatFormat(tokenizer, TuluTemplate(), 64).parse(record) == expected


# ------------------------------------------------------------------------ reasoning_markers: the think form


def think_messages(index: int) -> list[dict[str, str]]:
    """OPENTHOUGHTS[index] as `reasoning_markers="think"` reads it: no system turn, the reply in the think form."""
    return [
        {"role": "user", "content": f"Return your final response within \\boxed{{}}. What is {index} + 3?"},
        {
            "role": "assistant",
            "content": f"<think>\n\n{index} plus 3 is {index + 3}.\n\n</think>\n\n\\boxed{{{index + 3}}}",
        },
    ]


def test_think_markers_rewrite_openthoughts_replies_into_the_form_grpos_reward_reads(tokenizer, tmp_path):
    parquet = write_parquet(tmp_path / "train-00000-of-00001.parquet", OPENTHOUGHTS)
    fmt = ChatFormat(tokenizer, TuluTemplate(), 512, reasoning_markers="think")
    record = next(iter(fmt.read(parquet))).value
    assert fmt.parse(record) == think_messages(0)
    assert think_messages(0)[1]["content"] == "<think>\n\n0 plus 3 is 3.\n\n</think>\n\n\\boxed{3}"

    data = chat_data([parquet], tokenizer, max_length=512, shuffle=False, reasoning_markers="think")
    assert data.reasoning_markers == "think" and data.skipped["train"] == {}
    assert item_pairs(data) == encoded_messages(tokenizer, [think_messages(i) for i in range(5)])
    first = data.streams["train"][0]
    reply = [token for token, trained in zip(first["ids"], first["trained"], strict=True) if trained]
    assert tokenizer.decode(reply[:-1]) == "<think>\n\n0 plus 3 is 3.\n\n</think>\n\n\\boxed{3}"
    assert read_manifest(data._plan()["train"][0])["records"] == {
        "format": "chat",
        "format_version": 1,
        "template": {"name": "tulu", "fingerprint": template_fingerprint(TuluTemplate())},
        "max_length": 512,
        "reasoning_markers": "think",
    }

    # DeepScaleR's reward: the rewritten replies score 1, the replies as written 0 (no </think> to answer after)
    kept = [row["conversations"][1]["value"] for row in OPENTHOUGHTS]
    rewritten = [think_messages(i)[1]["content"] for i in range(5)]
    answers, prompts = [str(i + 3) for i in range(5)], [""] * 5
    assert ThinkThenAnswer(require_open=True)(rewritten, answers, prompts) == [1.0] * 5
    assert ThinkThenAnswer()(kept, answers, prompts) == [0.0] * 5


def test_keep_trains_on_the_replies_as_written_and_records_it(tokenizer, tmp_path):
    parquet = write_parquet(tmp_path / "openthoughts.parquet", OPENTHOUGHTS)
    default = chat_data([parquet], tokenizer, max_length=512, shuffle=False)
    keep = chat_data([parquet], tokenizer, max_length=512, shuffle=False, reasoning_markers="keep")
    assert default.reasoning_markers == keep.reasoning_markers == "keep"
    assert item_pairs(keep) == item_pairs(default) == encoded(tokenizer, OPENTHOUGHTS)
    assert default._plan() == keep._plan()  # the same first-use folder
    assert read_manifest(keep._plan()["train"][0])["records"]["reasoning_markers"] == "keep"
    think = chat_data([parquet], tokenizer, max_length=512, shuffle=False, reasoning_markers="think")
    assert think._plan()["train"][0] != keep._plan()["train"][0]  # the setting keys the first-use folder


def test_think_markers_leave_openr1_rows_as_they_are(tokenizer, tmp_path):
    rows = [openr1_row(i) for i in range(4)]
    parquet = write_parquet(tmp_path / "default-00000-of-00010.parquet", rows)
    think = chat_data([parquet], tokenizer, max_length=512, shuffle=False, reasoning_markers="think")
    assert item_pairs(think) == encoded(tokenizer, rows)
    assert ChatFormat(tokenizer, TuluTemplate(), 512, "think").parse(rows[0]) == rows[0]["messages"]
    assert rows[0]["messages"][1]["content"] == "<think>\nAdd 0 to both sides.\n</think>\n\nSo $x = \\boxed{4}$."


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (  # a system turn that asks for no marker stays; so do markers a user writes
            {
                "system": "Be brief.",
                "conversations": [
                    {"from": "user", "value": "What does <|begin_of_thought|> mark?"},
                    {"from": "assistant", "value": "<|begin_of_thought|>\nA thought.\n<|end_of_thought|>\nThe start."},
                ],
            },
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What does <|begin_of_thought|> mark?"},
                {"role": "assistant", "content": "<think>\nA thought.\n</think>\nThe start."},
            ],
        ),
        (  # a system turn naming only a solution marker is dropped too, inside `messages` as in `system`
            {
                "messages": [
                    {"role": "system", "content": "End with <|end_of_solution|>."},
                    {"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "<|begin_of_solution|> 4 <|end_of_solution|>"},
                    {"role": "user", "content": "And 3 + 3?"},
                    {"role": "assistant", "content": "6"},
                ]
            },
            [
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"},
                {"role": "assistant", "content": "6"},
            ],
        ),
    ],
)
def test_think_markers_rewrite_assistant_turns_and_drop_only_the_system_turn_asking_for_the_markers(
    tokenizer, record, expected
):
    assert ChatFormat(tokenizer, TuluTemplate(), 64, "think").parse(record) == expected
    as_written = ChatFormat(tokenizer, TuluTemplate(), 64).parse(record)
    assert as_written == ChatFormat(tokenizer, TuluTemplate(), 64, "keep").parse(record) != expected


def test_a_folder_prepared_with_think_markers_is_refused_with_keep_in_one_line(tokenizer, tmp_path):
    parquet = write_parquet(tmp_path / "openthoughts.parquet", OPENTHOUGHTS)
    folder = prepare(
        [parquet], tokenizer, tmp_path / "prepared", num_workers=1, val_fraction=0.0, format="chat",
        max_length=512, reasoning_markers="think",
    )  # fmt: skip
    assert read_manifest(folder)["records"]["reasoning_markers"] == "think"
    fits = chat_data([str(folder)], tokenizer, max_length=None, shuffle=False)  # settings from the folder
    assert fits.reasoning_markers == "think"
    assert item_pairs(fits) == encoded_messages(tokenizer, [think_messages(i) for i in range(5)])
    refused = ChatData([str(folder)], tokenizer=tokenizer, reasoning_markers="keep")
    with pytest.raises(ValueError) as error:
        refused.setup("fit")
    assert str(error.value) == (
        f"reasoning_markers='keep' differs from the 'think' {folder} was prepared with; prepare it again with "
        "--reasoning_markers keep, or set reasoning_markers='think'"
    )
    assert refused.streams == {}
    # a folder prepared before the setting existed has no `reasoning_markers`: its replies were taken as written
    old = {"max_length": 256}
    ChatData(["old"], tokenizer=tokenizer, max_length=256)._check_settings("old", old)  # keep: accepted
    with pytest.raises(ValueError) as error:
        ChatData(["old"], tokenizer=tokenizer, max_length=256, reasoning_markers="think")._check_settings("old", old)
    assert str(error.value) == (
        "reasoning_markers='think' differs from the 'keep' old was prepared with; prepare it again with "
        "--reasoning_markers think, or set reasoning_markers='keep'"
    )
    with pytest.raises(ValueError) as error:
        ChatData([str(folder)], tokenizer=tokenizer, reasoning_markers="xml")
    assert str(error.value) == "reasoning_markers='xml' is not one of keep, think"


# -------------------------------------------------------------------------------------- built-in think form


def test_builtin_think_chat_answers_after_the_reasoning_in_a_box(tokenizer):
    records = list(chat_records("arithmetic_think", count=50, seed=3))
    assert records == list(chat_records("arithmetic_think", count=50, seed=3))  # deterministic
    completions, answers = [], []
    for index, record in enumerate(records):
        question, solution, answer = arithmetic_problem((3 << 32) + index)
        user, reply = record["messages"]
        assert user == {"role": "user", "content": f"{question} {BOXED_INSTRUCTION}"}
        steps = solution.removesuffix(f"\n#### {answer}")
        assert reply["content"] == (f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{{answer}}}.")
        assert think_solution((3 << 32) + index) == (user["content"], reply["content"], answer)
        completions.append(reply["content"])
        answers.append(str(answer))
    prompts = [""] * len(answers)
    assert ThinkThenAnswer(require_open=True)(completions, answers, prompts) == [1.0] * 50
    assert Format(answer="boxed", think=True)(completions, answers, prompts) == [1.0] * 50
    wrong = [str(int(a) + 1) for a in answers]
    assert ThinkThenAnswer()(completions, wrong, prompts) == [0.0] * 50
    data = chat_data(["builtin-chat:arithmetic_think?count=20"], tokenizer, max_length=512)
    assert data.count() == 20 and data.skipped["train"] == {}


def test_builtin_think_prompts_ask_the_chat_problems_with_deepscalers_instruction():
    prompts = list(prompt_records("arithmetic_think", count=30, seed=1))
    chats = list(chat_records("arithmetic_think", count=30, seed=1))
    assert [p["prompt"] for p in prompts] == [c["messages"][0]["content"] for c in chats]
    assert [p["answer"] for p in prompts] == [str(arithmetic_problem((1 << 32) + i)[2]) for i in range(30)]
    assert all(
        p["prompt"].endswith(" Let's think step by step and output the final answer within \\boxed{}.") for p in prompts
    )
    # the local chain's GRPO prompts (seed 1) are other problems than its reasoning SFT's (seed 0)
    sft = {c["messages"][0]["content"] for c in chat_records("arithmetic_think", count=3000)}
    # (the templates draw from small number ranges: 101 of the 2000 are also SFT problems)
    assert sum(p["prompt"] in sft for p in prompt_records("arithmetic_think", count=2000, seed=1)) == 101
