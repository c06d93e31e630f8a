"""Prompts for GRPO: exact prompt ids (the template with its generation prompt), reference answers from the three
record shapes (a plain answer, GSM8K's `#### N`, MATH's boxed solution), counted skips and the one-line error when
none is left, the built-in offline prompts, the split of the prompts between two processes, and `conf/grpo.yaml`
(with its CPU overlay) as `--print_config` resolves it."""

import pytest
import torch

from datamodules.prompts import (
    BAD_PROMPT,
    ENDS_WITH_REPLY,
    NO_ANSWER,
    NO_BOXED,
    NO_PROMPT,
    TOO_LONG,
    UNKNOWN_ROLE,
    PromptData,
    collate_prompts,
    last_boxed,
    prompt_from_record,
)
from moxin_lightning.data.builtin_chat import ANSWER_INSTRUCTION, arithmetic_problem, prompt_records, pydoc_sections
from moxin_lightning.data.sources import BAD_JSON, DataError
from moxin_lightning.tokenizers import SentencePieceTokenizer, train_tokenizer
from moxin_lightning.tokenizers.chat import TuluTemplate
from tests.prepared_data import write_records

from .test_chat_data import solve
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
    assert len(data.datasets["train"]) == 1
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
    assert data.skipped_examples["train"][0] == f"{path}:2: {NO_PROMPT}"
    assert "train: 1 prompts; skipped 8" in data.summary()

    only_long = write_records(tmp_path / "long.jsonl", [{"prompt": long_question, "answer": "1"}] * 3)
    with pytest.raises(ValueError) as error:
        prompt_data([only_long], tokenizer, max_prompt_length=64)
    assert str(error.value) == (
        f"no usable prompt in train data {[only_long]} at max_prompt_length=64 (skipped: {TOO_LONG}: 3); "
        "check the records' prompt and answer fields or raise max_prompt_length"
    )
    assert "\n" not in str(error.value)


def test_refusals_are_one_line_and_come_before_any_reading(tokenizer):
    with pytest.raises(ValueError, match="^PromptData needs the model's tokenizer: set data.tokenizer"):
        PromptData(["x.jsonl"])
    with pytest.raises(ValueError, match=r"^max_prompt_length=1 must be at least 2"):
        PromptData(["x.jsonl"], tokenizer=tokenizer, max_prompt_length=1)
    with pytest.raises(DataError, match="builtin-chat:arithmetic holds no prompts with answers"):
        prompt_data(["builtin-chat:arithmetic"], tokenizer)
    with pytest.raises(DataError, match="unknown builtin-prompts:pydoc: the built-in prompts are"):
        prompt_data(["builtin-prompts:pydoc"], tokenizer)
    data = PromptData(["builtin-prompts:arithmetic?count=3"], tokenizer=tokenizer, max_prompt_length=64, max_seq_len=64)
    with pytest.raises(ValueError, match="^max_prompt_length=64 leaves no room for a response in the model's"):
        data.setup("fit")


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
    first = data.datasets["train"][0]
    assert first["answer"] == records[0]["answer"] and first["prompt_text"] == records[0]["prompt"]
    assert len(data.datasets["train"]) == 50 and data.skipped["train"] == {}


def test_two_processes_split_every_epoch_s_prompts_once(tokenizer):
    """What Lightning does under DDP: wrap the loader's sampler in its distributed sampler, set the epoch."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader

    data = prompt_data(["builtin-prompts:arithmetic?count=40"], tokenizer, batch_size=4)
    loader = data.train_dataloader()
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = _get_distributed_sampler(
                loader, _is_dataloader_shuffled(loader), overfit_batches=0, num_replicas=2, rank=rank
            )
            rank_loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
            _set_sampler_epoch(rank_loader, epoch)
            batches = list(rank_loader)
            assert [len(b["prompt_ids"]) for b in batches] == [4] * 5  # 20 prompts each, batch_size per process
            for batch in batches:
                for ids, answer, index in zip(
                    batch["prompt_ids"], batch["answer"], batch["prompt_index"].tolist(), strict=True
                ):
                    assert ids == data.datasets["train"][index]["prompt_ids"]
                    assert answer == data.datasets["train"][index]["answer"]
                    seen.append(index)
        assert sorted(seen) == list(range(40))  # every prompt once, by one of the two


def test_collate_keeps_lists():
    items = [{"prompt_ids": [1, 5], "prompt_text": "a", "answer": "1", "prompt_index": 3}]
    items.append({"prompt_ids": [1, 6, 7], "prompt_text": "b", "answer": "2", "prompt_index": 0})
    batch = collate_prompts(items)
    assert batch["prompt_ids"] == [[1, 5], [1, 6, 7]] and batch["prompt_text"] == ["a", "b"]
    assert batch["answer"] == ["1", "2"] and batch["prompt_index"].tolist() == [3, 0]


# -------------------------------------------------------------------------------------------------------- configs


def test_grpo_configs_carry_moxin_reasoning_settings_and_the_local_overlay_resolves():
    full = printed_config(*configs(GRPO))
    model, data, trainer = full["model"]["init_args"], full["data"]["init_args"], full["trainer"]
    assert full["model"]["class_path"] == "moxin_lightning.tasks.GRPO"
    assert (model["group_size"], model["beta"], model["temperature"], model["top_p"]) == (8, 0.001, 0.6, 1.0)
    assert (model["lr"], model["schedule"], model["clip_low"], model["clip_high"]) == (1e-6, "constant", 0.2, 0.2)
    assert model["max_response_length"] == 16384 and data["max_prompt_length"] == 1024
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 64  # prompts per step
    assert model["init_from"] == "runs/dpo/release" and model["epochs_per_batch"] == 1
    assert [r["class_path"] for r in model["rewards"]] == ["moxin_lightning.rewards.MathAnswer"]
    assert model["reward_weights"] == [1.0] and model["max_grad_norm"] == 1.0 and trainer["gradient_clip_val"] is None
    assert full["data"]["class_path"] == "datamodules.PromptData"

    local = printed_config(*configs(GRPO, GRPO_LOCAL))
    model, data, trainer = local["model"]["init_args"], local["data"]["init_args"], local["trainer"]
    assert (model["preset"], model["init_from"], trainer["accelerator"]) == ("moxin-tiny-9m", "runs/sft/release", "cpu")
    assert data["train"] == ["builtin-prompts:gsm_symbolic?count=2000&seed=1"] and data["instruction"] is None
    assert model["beta"] == 0.001 and model["temperature"] == 0.6  # Moxin's settings stay
    assert model["group_size"] < 8 and model["max_response_length"] < 16384
    assert [r["class_path"].rsplit(".", 1)[1] for r in model["rewards"]] == ["MathAnswer", "Format"]
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
