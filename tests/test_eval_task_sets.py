"""The task sets of Moxin's Instruct and reasoning tables (moxin_lightning/evaluation/tasks/hub).

The Hub is out of reach here, so each shipped task is run on a few records written in its dataset's own shape
(the real column names) through `task_sets.task_on_files`, answered by a fake LM whose replies are known, and
its score is checked; what lm-eval supplies is checked from its index (names and shot counts) without data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.evaluator import evaluate  # noqa: E402

from moxin_lightning.cli import main  # noqa: E402
from moxin_lightning.evaluation import task_sets, task_utils  # noqa: E402
from moxin_lightning.evaluation.in_loop import flat_scores  # noqa: E402


class ScriptedLM(LM):
    """Answers generation requests from a script: the first key found in the prompt's question (after its last
    "Problem:", "Q: " or "<|user|>", so not in a few-shot example) picks the reply list, cycled in order (a
    problem's 16 samples get the list's replies in turn)."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        super().__init__()
        self.script, self.used, self.prompts = script, {}, []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        replies = []
        for request in requests:
            prompt = request.args[0]
            self.prompts.append(prompt)
            question = prompt[max(prompt.rfind(marker) for marker in ("Problem:", "Q: ", "<|user|>")) :]
            key = next(k for k in self.script if k in question)
            index = self.used.get(key, 0)
            self.used[key] = index + 1
            replies.append(self.script[key][index % len(self.script[key])])
        return replies

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def score(name: str, files: dict[str, Path], script: dict[str, list[str]]) -> tuple[dict[str, float], ScriptedLM]:
    task = task_on_files(name, files)
    lm = ScriptedLM(script)
    results = evaluate(lm=lm, task_dict={"tasks": {name: task}}, bootstrap_iters=0)
    return flat_scores(results), lm


task_on_files = task_sets.task_on_files

# One problem per dataset shape: records as the Hub datasets hold them (HuggingFaceH4/MATH-500, math-ai/amc23,
# math-ai/minervamath, math-ai/olympiadbench), the columns the task reads and others beside them.
REASONING_RECORDS = {
    "moxin_math500": [
        {"problem": "What is $3+4$?", "solution": "$3+4=\\boxed{7}$", "answer": "7", "subject": "Prealgebra",
         "level": 1, "unique_id": "test/prealgebra/1.json"},
        {"problem": "Simplify $\\frac{6}{8}$.", "solution": "$\\boxed{\\frac34}$", "answer": "\\frac{3}{4}",
         "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
    ],
    "moxin_amc23": [
        {"id": 0, "question": "How many primes are below 10?", "answer": 4.0, "url": "https://x/AMC_12A/1"},
        {"id": 1, "question": "What is the sum of the first 5 odd numbers?", "answer": 25.0, "url": "https://x/2"},
    ],
    "moxin_minerva_math": [
        {"question": "A star has a parallax of 0.1 arcsec. What is its distance in parsecs?", "answer": "10"},
        {"question": "What is the speed of light in m/s, to one significant figure?", "answer": "3 \\times 10^{8}"},
    ],
    "moxin_olympiadbench": [
        {"id": 1, "question": "Find all real $x$ with $x^2=4$.", "final_answer": ["$-2, 2$"], "modality": "Text-only",
         "answer_type": "Numerical", "is_multiple_answer": True, "unit": None},
        {"id": 2, "question": "Compute $\\sqrt{2}\\cdot\\sqrt{8}$.", "final_answer": ["$4$"],
         "modality": "Text-only", "answer_type": "Numerical", "is_multiple_answer": False, "unit": None},
    ],
}  # fmt: skip

# Replies for each problem's 16 samples (cycled): the first problem right in 12 of 16, the second in 2 of 4 replies
# (8 of 16), so pass@1 is (12/16 + 8/16) / 2 = 0.625 on every dataset.
REASONING_SCRIPTS = {
    "moxin_math500": {
        "$3+4$": ["so \\boxed{7}"] * 12 + ["\\boxed{8}"] * 4,
        "frac{6}{8}": ["\\boxed{0.75}", "\\boxed{\\dfrac{3}{4}}", "\\boxed{6/9}", "no box: 3/4"],
    },
    "moxin_amc23": {
        "primes": ["There are \\boxed{4}."] * 12 + ["\\boxed{5}"] * 4,
        "odd numbers": ["\\boxed{25}", "\\boxed{25.0}", "\\boxed{24}", "25"],
    },
    "moxin_minerva_math": {
        "parallax": ["d = 1/p = \\boxed{10}"] * 12 + ["\\boxed{0.1}"] * 4,
        "speed of light": ["\\boxed{3 \\times 10^8}", "\\boxed{300000000}", "\\boxed{3e5}", "\\boxed{}"],
    },
    "moxin_olympiadbench": {
        "x^2=4": ["\\boxed{-2, 2}"] * 12 + ["\\boxed{2}"] * 4,
        "sqrt{8}": ["\\boxed{4}", "\\boxed{\\sqrt{16}}", "\\boxed{16}", "\\boxed{2\\sqrt{2}}"],
    },
}


@pytest.mark.parametrize("name", sorted(REASONING_RECORDS))
def test_reasoning_tasks_score_pass_at_1_over_sampled_completions(tmp_path, name):
    suffix = ".parquet" if name == "moxin_olympiadbench" else ".jsonl"  # a list column, as the Hub's parquet has
    data = write(tmp_path / f"test{suffix}", REASONING_RECORDS[name])
    scores, lm = score(name, {"test": data}, REASONING_SCRIPTS[name])
    assert scores == {f"{name}/pass@1": 0.625}
    assert len(lm.prompts) == 2 * 16  # 16 sampled completions per problem
    first = REASONING_RECORDS[name][0]
    problem = first.get("problem", first.get("question"))
    assert lm.prompts[0] == f"<|user|>\n{problem} {task_utils.REASONING_INSTRUCTION}\n<|assistant|>\n"


def test_reasoning_tasks_sample_as_deepscaler_evaluates():
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in ("moxin_math500", "moxin_amc23", "moxin_minerva_math", "moxin_olympiadbench"):
        config = load_yaml(task_sets.HUB_DIR / f"{name}.yaml", resolve_func=False)
        assert config["repeats"] == 16 and config["num_fewshot"] == 0
        assert config["generation_kwargs"] == {
            "until": [], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 16384
        }  # fmt: skip


def test_the_reasoning_prompt_is_the_token_sequence_grpo_trains_on(tmp_path):
    """lm-eval encodes the prompt after BOS; that equals TuluTemplate's encoding of the conversation GRPO builds."""
    import torch

    from moxin_lightning.evaluation.lm import MoxinLM
    from moxin_lightning.model import ModelConfig, Transformer
    from moxin_lightning.tokenizers import SentencePieceTokenizer
    from moxin_lightning.tokenizers.chat import TULU
    from tests.prepared_data import train_tiny_bpe

    words = "find the value of x so that two plus three equals five and think step by step boxed answer".split()
    tokenizer = SentencePieceTokenizer(train_tiny_bpe(tmp_path, words))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    lm = MoxinLM(model, tokenizer)
    problem = "Find the value of $x$ so that $2 + x = 5$."
    prompt = task_utils.reasoning_prompt({"problem": problem, "answer": "3"})
    messages = [{"role": "user", "content": f"{problem} {task_utils.REASONING_INSTRUCTION}"}]
    assert lm.tok_encode(prompt) == TULU.encode(tokenizer, messages, add_generation_prompt=True)[0]


def test_math_uses_the_minerva_format_with_four_worked_training_solutions(tmp_path):
    train = [
        {"problem": f"Training problem {i}?", "level": "Level 1", "type": "Algebra",
         "solution": f"Worked solution {i}, so $\\boxed{{{i}}}$."}
        for i in range(6)
    ]  # fmt: skip
    test = [
        {"problem": "Solve $2y = 10$.", "level": "Level 2", "type": "Algebra", "solution": "$y=\\boxed{5}$."},
        {"problem": "Find $\\sqrt{49}$.", "level": "Level 1", "type": "Algebra", "solution": "It is $\\boxed{7}$."},
        {"problem": "What is half of $1$?", "level": "Level 1", "type": "Algebra",
         "solution": "$\\boxed{\\frac{1}{2}}$"},
    ]  # fmt: skip
    files = {"train": write(tmp_path / "train.jsonl", train), "test": write(tmp_path / "test.jsonl", test)}
    script = {"2y = 10": [" So $y = \\boxed{5}$."], "sqrt{49}": [" $\\boxed{-7}$"], "half of": [" $\\boxed{0.5}$"]}
    scores, lm = score("moxin_math_algebra", files, script)
    assert scores == {"moxin_math_algebra/math_verify": 2 / 3}
    shots = "".join(f"Problem:\nTraining problem {i}?\n\nSolution: {train[i]['solution']}\n\n" for i in range(4))
    assert lm.prompts[0] == shots + "Problem:\nSolve $2y = 10$.\n\nSolution:"


def test_popqa_counts_a_reply_that_contains_a_possible_answer_with_15_shots(tmp_path):
    records = [
        {"id": i, "subj": f"Person {i}", "prop": "occupation", "obj": f"job {i}", "s_pop": 100 + i, "o_pop": 7,
         "question": f"What is Person {i}'s occupation?",
         "possible_answers": json.dumps([f"job {i}", f"work {i}"])}
        for i in range(20)
    ]  # fmt: skip
    data = write(tmp_path / "test.jsonl", records)
    script = {f"Person {i}'s": [" She worked as a Work " + str(i) + "."] if i % 2 else [" unknown"] for i in range(20)}
    scores, lm = score("moxin_popqa", {"test": data}, script)
    assert scores == {"moxin_popqa/exact_match": 0.5}  # the odd-numbered half name an answer (any case)
    first = lm.prompts[0]
    assert first.count("Q: ") == 16 and first.endswith("A:")
    question = first.rsplit("\n\n", 1)[-1]
    assert first.count(question.removesuffix(" A:")) == 1  # the question is never one of its own shots


def _leaf_shots(manager, name: str, shots: int | None = None) -> dict[str, int | None]:
    """Leaf task -> num_fewshot, read from lm-eval's index (no YAML functions run, no data read)."""
    entry = manager.task_index[name]
    config = entry.cfg or {}
    if entry.kind.name == "TAG":  # a tag names its tasks
        return {leaf: n for task in sorted(entry.tags) for leaf, n in _leaf_shots(manager, task, shots).items()}
    if entry.kind.name == "GROUP":
        leaves: dict[str, int | None] = {}
        for child in config["task"]:
            child_name = child if isinstance(child, str) else child.get("task") or child.get("group")
            if isinstance(child_name, list):  # an inline subgroup: its own task list
                for grandchild in child_name:
                    leaves |= _leaf_shots(manager, grandchild, child.get("num_fewshot", shots))
            else:
                override = child.get("num_fewshot", shots) if isinstance(child, dict) else shots
                leaves |= _leaf_shots(manager, child_name, override)
        return leaves
    return {name: config.get("num_fewshot") if shots is None else shots}


def test_the_instruct_set_is_moxin_s_eight_benchmarks_with_olmes_shot_counts():
    manager = task_sets.task_manager(with_hub=True)
    leaves = _leaf_shots(manager, "moxin_instruct")
    prefixes = ("gsm8k_cot", "moxin_math_", "humaneval_plus", "humaneval", "mmlu_flan_cot_zeroshot", "moxin_popqa",
                "bbh_cot_fewshot", "truthfulqa_mc2")  # fmt: skip
    families: dict[str, set] = {}
    for name, shots in leaves.items():
        family = next(prefix for prefix in prefixes if name.startswith(prefix))
        families.setdefault(family, set()).add(shots or 0)
    assert families == {
        "gsm8k_cot": {8}, "moxin_math_": {4}, "humaneval": {0}, "humaneval_plus": {0},
        "mmlu_flan_cot_zeroshot": {0}, "moxin_popqa": {15}, "bbh_cot_fewshot": {3}, "truthfulqa_mc2": {0},
    }  # fmt: skip
    counts = {family: sum(name.startswith(family) for name in leaves) for family in ("moxin_math_", "bbh_cot_", "mmlu")}
    assert counts == {"moxin_math_": 7, "bbh_cot_": 27, "mmlu": 57}
    assert task_sets.code_running_tasks(manager, "moxin_instruct") == ["humaneval", "humaneval_plus"]
    assert task_sets.code_running_tasks(manager, "moxin_reasoning") == []


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """Empty dataset, hub and evaluate-module caches, offline: as a machine that never downloaded them."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.delenv(task_sets.CODE_EVAL_VARIABLE, raising=False)


FIX = (
    "from the Hugging Face Hub, which is not in the local cache; run once with network access "
    "(HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or evaluate the offline task set --tasks moxin_local"
)


@pytest.mark.parametrize(
    ("name", "dataset"),
    [
        ("moxin_reasoning", "HuggingFaceH4/MATH-500"),
        ("moxin_amc23", "math-ai/amc23"),
        ("moxin_minerva_math", "math-ai/minervamath"),
        ("moxin_olympiadbench", "math-ai/olympiadbench"),
        ("moxin_popqa", "akariasai/PopQA"),
        ("moxin_math", "EleutherAI/hendrycks_math"),
    ],
)
def test_a_shipped_task_without_its_cached_dataset_is_one_line_naming_it(no_hub_cache, name, dataset):
    with pytest.raises(ValueError) as raised:
        task_sets.resolve_tasks([name])
    assert str(raised.value) == f"task {name!r} needs dataset {dataset!r} {FIX}"


def test_code_running_tasks_need_the_documented_opt_in(no_hub_cache, monkeypatch, tmp_path, capsys):
    refused = (
        "scores the model by running the code it writes (lm-eval's code_eval); set HF_ALLOW_CODE_EVAL=1 to allow "
        "that, in an isolated environment, or leave"
    )
    with pytest.raises(ValueError) as raised:
        task_sets.resolve_tasks(["moxin_instruct"])
    assert str(raised.value) == f"task 'humaneval' (in 'moxin_instruct') {refused} humaneval, humaneval_plus out"
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--checkpoint", str(tmp_path / "model"), "--tasks", "humaneval_plus"])
    assert stop.value.code == 2
    message = f"error: task 'humaneval_plus' {refused} humaneval_plus out"
    assert capsys.readouterr().err.strip().splitlines() == [message]
    monkeypatch.setenv(task_sets.CODE_EVAL_VARIABLE, "1")  # allowed: now lm-eval's code_eval metric must be cached
    with pytest.raises(ValueError) as raised:
        task_sets.resolve_tasks(["humaneval"])
    assert str(raised.value) == (
        "task 'humaneval' needs Hugging Face evaluate's 'code_eval' metric, which is not in the local cache; run once "
        "with network access (HF_HUB_OFFLINE=0 HF_EVALUATE_OFFLINE=0) to cache it"
    )


def test_task_on_files_refuses_groups_and_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match=r"^'moxin_reasoning' is not a task defined by a YAML file"):
        task_on_files("moxin_reasoning", {"test": tmp_path / "a.jsonl"})
    with pytest.raises(ValueError, match=r"must all be \.jsonl, \.json, \.parquet or \.csv files of one kind$"):
        task_on_files("moxin_amc23", {"test": tmp_path / "a.txt"})


def test_a_generation_without_stop_strings_runs_in_one_decode_call(tmp_path, monkeypatch):
    """The reasoning tasks stop at EOS only: MoxinLM then generates all max_gen_toks in one call (no re-prefill
    every 32 tokens to look for stop strings), with the tokens greedy generation gives."""
    import torch

    from moxin_lightning.evaluation import lm as lm_module
    from moxin_lightning.evaluation.lm import MoxinLM
    from moxin_lightning.generate import generate
    from moxin_lightning.model import ModelConfig, Transformer
    from moxin_lightning.tokenizers import SentencePieceTokenizer
    from tests.prepared_data import train_tiny_bpe

    tokenizer = SentencePieceTokenizer(train_tiny_bpe(tmp_path, "two plus three is five so the answer".split()))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    calls = []
    monkeypatch.setattr(lm_module, "generate", lambda *a, **k: calls.append(a[2]) or generate(*a, **k))
    lm = MoxinLM(model, tokenizer, batch_size=2)
    prompts = ["two plus three is", "so the answer"]
    kwargs = {"until": [], "do_sample": False, "max_gen_toks": 70}
    texts = lm.generate_until([Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)])
    assert calls == [70]  # one call for the batch, all 70 tokens at once
    rows = [lm.tok_encode(p) for p in prompts]
    expected = generate(model, rows, 70, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    assert texts == [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in expected]
