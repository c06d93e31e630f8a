"""Prompts for GRPO: exact prompt ids (the template with its generation prompt), reference answers from the three
record shapes (a plain answer, GSM8K's `#### N`, MATH's boxed solution), counted skips and the one-line error when
none is left, `prepare --format prompts --instruction` through the command line and the refusal of another
instruction, the built-in offline prompts, the split of the prompts between two processes, and `conf/grpo.yaml`
(with its CPU overlay) as `--print_config` resolves it."""

from collections import Counter

import numpy as np
import pytest
import torch

from moxin_lightning.data import read_manifest
from moxin_lightning.data.builtin_chat import (
    ANSWER_INSTRUCTION,
    arithmetic_problem,
    prompt_records,
    prompt_records_of,
    pydoc_sections,
)
from moxin_lightning.data.prepare import prepare
from moxin_lightning.data.prompt_records import (
    BAD_PROMPT,
    ENDS_WITH_REPLY,
    NO_ANSWER,
    NO_BOXED,
    NO_PROMPT,
    TOO_LONG,
    UNKNOWN_ROLE,
    last_boxed,
    prompt_from_record,
)
from moxin_lightning.data.records import template_fingerprint
from moxin_lightning.data.sources import BAD_JSON, DataError
from moxin_lightning.datamodules.prompts import PromptData, collate_prompts
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.prepared_data import write_records

from .test_chat_data import command, items, order, solve, two_processes
from .test_cli import ROOT, command_line, configs, printed_config  # noqa: F401  (command_line: autouse fixture)

GRPO, GRPO_LOCAL = ROOT / "conf" / "grpo.yaml", ROOT / "conf" / "grpo-local.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    """A 400-piece BPE trained in a few milliseconds on pydoc text and the template's headers."""
    texts = [section.body for section in pydoc_sections()[:60]] + ["<|system|>\n<|user|>\n<|assistant|>\n"] * 20
    folder = train_tokenizer(
        iter(texts), 400, tmp_path_factory.mktemp("prompt-tokenizer"), progress=False, minloglevel=2
    )
    return SentencePieceTokenizer(folder)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Raw records are prepared on first use into $MOXIN_CACHE/records: this module's own cache, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOXIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def prompt_data(files, tokenizer, **kwargs) -> PromptData:
    data = PromptData(list(files), tokenizer=tokenizer, **{"max_prompt_length": 256, "batch_size": 4, **kwargs})
    data.setup("fit")
    return data


# ------------------------------------------------------------------------------------------------------ records


def test_prompt_ids_are_the_template_encoding_with_the_generation_prompt(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    files = write_records(
        tmp_path / "p.jsonl",
        [{"prompt": "What is 6 * 7?", "answer": "42"}, {"prompt": conversation, "answer": "5"}],
    )
    data = prompt_data([files], tokenizer, shuffle=False)
    batch = next(iter(data.train_dataloader()))
    template = TuluTemplate()
    expected = [
        template.encode(tokenizer, [{"role": "user", "content": "What is 6 * 7?"}], add_generation_prompt=True)[0],
        template.encode(tokenizer, conversation, add_generation_prompt=True)[0],
    ]
    assert batch["prompt_ids"] == expected
    replied, trained = template.encode(tokenizer, [*conversation, {"role": "assistant", "content": "5"}])
    assert replied[: len(expected[1])] == expected[1] and not any(trained[: len(expected[1])])  # as SFT saw it
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in batch["prompt_ids"])
    assert batch["prompt_text"] == ["What is 6 * 7?", "What is 2 + 3?"]
    assert batch["answer"] == ["42", "5"]
    assert batch["prompt_index"].dtype == torch.long and batch["prompt_index"].tolist() == [0, 1]


def test_reference_answers_from_plain_gsm8k_and_boxed_records():
    gsm8k = {"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3 bags * 4 = <<3*4=12>>12\n#### 12"}
    math = {"problem": "Half of one?", "solution": r"Not $\boxed{2}$ but $\boxed{\frac{1}{2}}$."}  # the last box
    plain = {"prompt": "Capital of France?", "answer": " Paris "}
    number = {"prompt": "1 + 1?", "answer": 2}
    deepscaler = {"problem": "x?", "answer": "7", "solution": r"\boxed{8}"}  # `answer` wins over the solution
    assert [prompt_from_record(r).answer for r in (gsm8k, math, plain, number, deepscaler)] == [
        "12",
        r"\frac{1}{2}",
        "Paris",
        "2",
        "7",
    ]
    assert prompt_from_record(gsm8k).messages == [{"role": "user", "content": gsm8k["question"]}]
    assert prompt_from_record(math, "Think.").messages == [{"role": "user", "content": "Half of one? Think."}]
    assert last_boxed(r"\boxed{a{b}c} and \boxed {d}") == "d" and last_boxed(r"\boxed{open") is None
    assert prompt_from_record({"problem": "x", "solution": "no box"}) == NO_BOXED
    assert prompt_from_record({"problem": "x"}) == NO_ANSWER


def test_unusable_records_are_skipped_and_counted_and_none_left_is_a_one_line_error(tmp_path, tokenizer):
    long_question = "word " * 400
    records = [
        {"prompt": "Fine?", "answer": "yes"},
        {"answer": "1"},
        {"prompt": 5, "answer": "1"},
        {"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "answer": "A"},
        {"prompt": "No answer here"},
        {"problem": "Boxless", "solution": "the answer is 3"},
        {"prompt": long_question, "answer": "1"},
        "{not json",
    ]
    path = write_records(tmp_path / "p.jsonl", records)
    data = prompt_data([path], tokenizer, max_prompt_length=64)
    assert data.count() == 1
    assert data.skipped["train"] == {
        NO_PROMPT: 1,
        BAD_PROMPT: 1,
        UNKNOWN_ROLE: 1,
        ENDS_WITH_REPLY: 1,
        NO_ANSWER: 1,
        NO_BOXED: 1,
        TOO_LONG: 1,
        BAD_JSON: 1,
    }
    assert data.split_entry("train")["skipped_examples"][0] == f"{path}:2: {NO_PROMPT}"
    assert "train: 1 records (0 truncated)" in data.summary() and "skipped 8 (" in data.summary()

    only_long = write_records(tmp_path / "long.jsonl", [{"prompt": long_question, "answer": "1"}] * 3)
    with pytest.raises(ValueError) as error:
        prompt_data([only_long], tokenizer, max_prompt_length=64)
    assert str(error.value) == (
        f"no usable prompts record in {only_long} at max_prompt_length=64 (skipped: {TOO_LONG}: 3); "
        "check the records, or raise max_prompt_length"
    )
    assert "\n" not in str(error.value)


def test_refusals_are_one_line_and_come_before_any_reading(tokenizer):
    with pytest.raises(ValueError, match="^PromptData needs the model's tokenizer for raw records: set data.tokenizer"):
        PromptData(["x.jsonl"]).setup("fit")  # x.jsonl does not exist: refused before it is looked for
    with pytest.raises(ValueError, match=r"^max_prompt_length=1 must be at least 2"):
        PromptData(["x.jsonl"], tokenizer=tokenizer, max_prompt_length=1)
    with pytest.raises(
        DataError, match="^builtin-chat:arithmetic holds no prompts records; the built-in prompts corpora are builtin-"
    ):
        prompt_data(["builtin-chat:arithmetic"], tokenizer)
    with pytest.raises(DataError, match="unknown builtin-prompts:pydoc: the built-in prompts are"):
        prompt_data(["builtin-prompts:pydoc"], tokenizer)
    data = PromptData(["builtin-prompts:arithmetic?count=3"], tokenizer=tokenizer, max_prompt_length=64, max_seq_len=64)
    with pytest.raises(ValueError, match="^max_prompt_length=64 leaves no room for a response in the model's"):
        data.setup("fit")


# ------------------------------------------------------------------------------------- prepare --format prompts

INSTRUCTION = "Think step by step."


def test_prepare_format_prompts_with_an_instruction_on_the_command_line(tokenizer, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    usable = [
        ({"prompt": "What is 6 * 7?", "answer": "42"}, "42"),
        ({"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3 * 4 = 12\n#### 12"}, "12"),
        ({"problem": "Half of one?", "solution": r"It is $\boxed{\frac{1}{2}}$."}, r"\frac{1}{2}"),
        ({"prompt": conversation, "answer": 5}, "5"),
    ]
    unusable = [
        ({"answer": "1"}, NO_PROMPT),
        ({"prompt": "No answer here"}, NO_ANSWER),
        ({"problem": "Boxless", "solution": "the answer is 3"}, NO_BOXED),
        ({"prompt": "word " * 400, "answer": "1"}, TOO_LONG),
        ("{not json", BAD_JSON),
    ]
    path = write_records(tmp_path / "p.jsonl", [r for r, _ in usable[:2] + unusable + usable[2:]])
    builtin = "builtin-prompts:arithmetic?count=3"
    out = tmp_path / "prepared"
    result = command(
        tmp_path,
        *("prepare", "--format", "prompts", "--input", path, "--input", builtin, "--tokenizer", str(tokenizer.path)),
        *("--output", str(out), "--max_prompt_length", "256", "--instruction", INSTRUCTION),
        *("--val_fraction", "0", "--num_workers", "1"),
    )
    assert result.returncode == 0, result.stderr

    # what the items must be: file prompts with the instruction after their last turn, built-in ones as they are
    template = TuluTemplate()
    questions = [
        [{"role": "user", "content": "What is 6 * 7?"}],
        [{"role": "user", "content": "Tom has 3 bags of 4 apples. How many?"}],
        [{"role": "user", "content": "Half of one?"}],
        conversation,
    ]
    questions = [
        [*turns[:-1], {**turns[-1], "content": f"{turns[-1]['content']} {INSTRUCTION}"}] for turns in questions
    ]
    own = list(prompt_records_of(builtin))
    questions += [[{"role": "user", "content": record["prompt"]}] for record in own]
    answers = [answer for _, answer in usable] + [record["answer"] for record in own]
    expected_ids = [template.encode(tokenizer, turns, add_generation_prompt=True)[0] for turns in questions]

    manifest = read_manifest(out)
    assert manifest["records"] == {
        "format": "prompts",
        "format_version": 1,
        "template": {"name": "tulu", "fingerprint": template_fingerprint(TuluTemplate())},
        "max_prompt_length": 256,
        "instruction": INSTRUCTION,
    }
    skipped = dict(Counter(reason for _, reason in unusable))
    train = manifest["splits"]["train"]
    assert list(manifest["splits"]) == ["train"] and manifest["skipped"] == skipped
    assert {key: train[key] for key in ("records", "tokens", "trained_tokens", "truncated", "skipped")} == {
        "records": 7,
        "tokens": sum(map(len, expected_ids)),
        "trained_tokens": 0,
        "truncated": 0,
        "skipped": skipped,
    }
    assert result.stdout.splitlines() == [
        f"prepared {out}: train 7 records / {train['tokens']} tokens; fingerprint {manifest['fingerprint']}",
        "skipped 5 records: " + ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())),
    ]

    prepared = PromptData([str(out)], batch_size=3, shuffle=False)  # tokenizer and instruction from the folder
    prepared.setup("fit")
    assert prepared.instruction == INSTRUCTION and prepared.max_prompt_length == 256
    stored = items(prepared)
    assert [item["ids"].tolist() for item in stored] == expected_ids
    assert [item["answer"] for item in stored] == answers
    assert [item["text"].endswith(f" {INSTRUCTION}") for item in stored] == [True] * 4 + [False] * 3
    assert [item["text"] for item in stored[4:]] == [record["prompt"] for record in own]  # built-ins: as written

    # one encoder: PromptData on the raw inputs (prepared on first use) gives the same batches
    raw = PromptData(
        [path, builtin],
        tokenizer=tokenizer,
        max_prompt_length=256,
        instruction=INSTRUCTION,
        batch_size=3,
        shuffle=False,
    )
    raw.setup("fit")
    # the same items (sha256) and counts; only the number of chunks follows the number of workers
    assert {k: v for k, v in raw.manifests[0]["splits"]["train"].items() if k not in ("chunks", "chunk_sha256")} == {
        k: v for k, v in train.items() if k not in ("chunks", "chunk_sha256")
    }
    ours, theirs = list(prepared.train_dataloader()), list(raw.train_dataloader())
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a["prompt_ids"] == b["prompt_ids"] and a["prompt_text"] == b["prompt_text"]
        assert a["answer"] == b["answer"] and torch.equal(a["prompt_index"], b["prompt_index"])


def test_a_prepared_folder_with_another_instruction_is_refused_by_setup(tokenizer, tmp_path):
    path = write_records(tmp_path / "p.jsonl", [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(6)])
    out = tmp_path / "prepared"
    prepare([path], tokenizer, out, format="prompts", max_prompt_length=128, instruction=INSTRUCTION, val_fraction=0.0)
    cases = [
        (
            dict(instruction="Answer in French."),
            f"instruction='Answer in French.' differs from the {INSTRUCTION!r} {out} was prepared with; prepare it "
            f"again with --instruction Answer in French., or set instruction={INSTRUCTION!r}",
        ),
        (
            dict(max_prompt_length=512),
            f"max_prompt_length=512 is above the 128 {out} was prepared with: its records were cut or skipped at 128; "
            "prepare it again with --max_prompt_length 512, or set max_prompt_length=128",
        ),
    ]
    for kwargs, expected in cases:
        data = PromptData([str(out)], **kwargs)
        with pytest.raises(ValueError) as error:
            data.setup("fit")
        assert str(error.value) == expected
        assert data.streams == {}  # refused before anything is streamed
    same = PromptData([str(out)], instruction=INSTRUCTION)
    same.setup("fit")
    assert same.count() == 6 and all(item["text"].endswith(INSTRUCTION) for item in items(same))


# ------------------------------------------------------------------------------------------------ built-in prompts


def test_builtin_prompts_are_deterministic_with_correct_answers(tokenizer):
    records = list(prompt_records("arithmetic", count=200, seed=3))
    assert records == list(prompt_records("arithmetic", count=200, seed=3))
    assert records != list(prompt_records("arithmetic", count=200, seed=4))
    for index, record in enumerate(records):
        question, solution, answer = arithmetic_problem((3 << 32) + index)
        assert record["prompt"] == f"{question}\n{ANSWER_INSTRUCTION}"
        assert record["answer"] == str(answer) == str(solve(question))  # worked out from the question alone
        assert solution.endswith(f"#### {record['answer']}")
    data = prompt_data(["builtin-prompts:arithmetic?count=50&seed=3"], tokenizer, instruction="IGNORED")
    first = items(data)[0]
    assert first["answer"] == records[0]["answer"] and first["text"] == records[0]["prompt"]
    assert data.count() == 50 and data.skipped["train"] == {}


@pytest.mark.distributed
def test_two_processes_split_every_epoch_s_prompts_once(tokenizer, tmp_path):
    """Under DDP litdata's StreamingDataLoader splits the prompts between the processes: batch_size prompts per
    process and step, every prompt once per epoch, a new order each epoch drawn from (seed, epoch)."""
    settings = dict(train=["builtin-prompts:arithmetic?count=40"], max_prompt_length=256, batch_size=4, seed=11)
    data = PromptData(tokenizer=tokenizer, **settings)
    data.setup("fit")  # prepared once here, into the cache the two processes read
    prompts = items(data)
    ranks = two_processes(tmp_path, PromptData, settings, tokenizer)
    for epoch in (0, 1, 2):
        seen = []
        for rank in (0, 1):
            batches = ranks[rank][epoch]
            assert [len(b["prompt_ids"]) for b in batches] == [4] * 5  # 20 prompts each, batch_size per process
            for batch in batches:
                assert batch["prompt_index"] == batch["index"]
                for ids, answer, index in zip(batch["prompt_ids"], batch["answer"], batch["index"], strict=True):
                    assert ids == prompts[index]["ids"].tolist()
                    assert answer == prompts[index]["answer"]
                    seen.append(index)
        assert sorted(seen) == list(range(40))  # every prompt once, by one of the two
    for rank in (0, 1):
        assert order(ranks[rank][1]) != order(ranks[rank][0])  # a new order each epoch ...
        assert order(ranks[rank][2]) == order(ranks[rank][0])  # ... drawn from (seed, epoch): a new run repeats it


def test_collate_keeps_lists():
    stored = [{"ids": np.array([1, 5], dtype=np.int32), "text": "a", "answer": "1", "index": 3}]
    stored.append({"ids": np.array([1, 6, 7], dtype=np.int32), "text": "b", "answer": "2", "index": 0})
    batch = collate_prompts(stored)
    assert batch["prompt_ids"] == [[1, 5], [1, 6, 7]] and batch["prompt_text"] == ["a", "b"]
    assert all(type(token) is int for ids in batch["prompt_ids"] for token in ids)  # plain ints, not numpy's
    assert batch["answer"] == ["1", "2"] and batch["prompt_index"].tolist() == [3, 0]
    assert batch["prompt_index"].dtype == torch.long


# -------------------------------------------------------------------------------------------------------- configs


def test_grpo_configs_carry_moxin_reasoning_settings_and_the_local_overlay_resolves():
    full = printed_config(*configs(GRPO))
    model, data, trainer = full["model"]["init_args"], full["data"]["init_args"], full["trainer"]
    assert full["model"]["class_path"] == "moxin_lightning.tasks.GRPO"
    assert (model["group_size"], model["beta"], model["temperature"], model["top_p"]) == (8, 0.001, 0.6, 1.0)
    assert (model["lr"], model["schedule"], model["clip_low"], model["clip_high"]) == (1e-6, "constant", 0.2, 0.2)
    assert model["max_response_length"] == 16384 and data["max_prompt_length"] == 1024
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 64  # prompts per step
    assert model["init_from"] == "runs/reasoning-sft/release" and model["epochs_per_batch"] == 1
    assert [r["class_path"] for r in model["rewards"]] == ["moxin_lightning.rewards.ThinkThenAnswer"]
    assert model["reward_weights"] == [1.0] and model["max_grad_norm"] == 1.0 and trainer["gradient_clip_val"] is None
    assert full["data"]["class_path"] == "moxin_lightning.datamodules.PromptData"

    local = printed_config(*configs(GRPO, GRPO_LOCAL))
    model, data, trainer = local["model"]["init_args"], local["data"]["init_args"], local["trainer"]
    assert (model["preset"], trainer["accelerator"]) == ("moxin-tiny-9m", "cpu")
    assert model["init_from"] == "runs/reasoning-sft/release"
    assert data["train"] == ["builtin-prompts:arithmetic_think?count=2000&seed=1"] and data["instruction"] is None
    assert model["beta"] == 0.001 and model["temperature"] == 0.6  # Moxin's settings stay
    assert model["group_size"] < 8 and model["max_response_length"] < 16384
    assert [r["class_path"].rsplit(".", 1)[1] for r in model["rewards"]] == ["ThinkThenAnswer", "Format"]
    assert model["rewards"][1]["init_args"] == {"answer": "boxed", "think": True, "pattern": None}
    assert model["reward_weights"] == [1.0, 0.1]


def test_gsm_symbolic_prompts_come_from_reasoning_gym_with_their_answers():
    """The local GRPO overlay's problems: reasoning-gym's gsm_symbolic (GSM8K templates, generated locally)."""
    import reasoning_gym

    from moxin_lightning.data.builtin_chat import ANSWER_INSTRUCTION, prompt_records_of
    from moxin_lightning.rewards import MathAnswer

    records = list(prompt_records_of("builtin-prompts:gsm_symbolic?count=5&seed=3"))
    expected = list(reasoning_gym.create_dataset("gsm_symbolic", size=5, seed=3))
    assert [r["answer"] for r in records] == [str(e["answer"]) for e in expected]
    assert [r["prompt"] for r in records] == [f"{e['question']}\n{ANSWER_INSTRUCTION}" for e in expected]
    assert records == list(prompt_records_of("builtin-prompts:gsm_symbolic?count=5&seed=3"))  # deterministic
    answers = [r["answer"] for r in records]
    assert MathAnswer()([f"... so\n#### {a}" for a in answers], answers, [""] * 5) == [1.0] * 5
