"""In-loop evaluation (`moxin_lightning.callbacks.InLoopEvaluation`): `moxin_local` scored on the live model every
few steps, on 1 process and on 2 (DDP and FSDP2, gloo): the same scores, those of a standalone evaluation of the
same weights, logged at their steps, and training left exactly as it would have run without them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from moxin_lightning.evaluation import local_data  # noqa: E402
from moxin_lightning.evaluation.in_loop import TaskSet  # noqa: E402
from tests import in_loop_eval_runs as runs  # noqa: E402
from tests.prepared_data import write_tiny_fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-piece BPE trained in milliseconds on the local task texts (as tests/test_evaluation.py's)."""
    from moxin_lightning.tokenizers.train import train_tokenizer

    texts = list(local_data.local_dataset("text.txt")["test"]["text"])
    texts += [record["question"] for record in local_data.arithmetic_records()]
    return train_tokenizer(iter(texts), 400, tmp_path_factory.mktemp("tok"), progress=False)


def run_here(out: Path, tokenizer: Path | None, evaluate: bool = True) -> dict:
    """A one-process run in this process, with the thread count the runs use (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return runs.train("auto", 1, out, tokenizer, evaluate=evaluate)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer_dir) -> dict:
    out = tmp_path_factory.mktemp("one")
    result = run_here(out, tokenizer_dir)
    result["logged"] = runs.logged_eval(out)
    return result


def standalone(weights: dict[str, torch.Tensor], tokenizer_dir: Path) -> tuple[dict[str, float], list[str]]:
    """The task set on a fresh model holding `weights`, outside any training (what `eval` would score): its scores
    and its generations."""
    from moxin_lightning.model import ModelConfig, Transformer
    from moxin_lightning.tokenizers import load_tokenizer

    model = Transformer(ModelConfig.from_name("moxin-tiny-9m", **{**runs.TINY, "vocab_size": runs.VOCAB}))
    model.load_state_dict(weights)
    task_set = TaskSet("moxin_local", limit=runs.LIMIT, batch_size=runs.BATCH)
    with runs.recording() as record:
        scores = task_set.evaluate(model.eval(), load_tokenizer(tokenizer_dir))
    return scores, record["generations"]


def test_one_process_logs_scores_at_every_nth_step_and_trains_exactly_as_without(one_process, tmp_path, tokenizer_dir):
    history = one_process["history_per_rank"][0]
    assert [step for step, _ in history] == [3, 6]
    names = {
        "moxin_local_arith_gen/exact_match.first_number", "moxin_local_arith_mc/acc", "moxin_local_arith_mc/acc_norm",
        "moxin_local_text/bits_per_byte", "moxin_local_text/byte_perplexity", "moxin_local_text/word_perplexity",
    }  # fmt: skip
    assert all(set(scores) == names for _, scores in history)
    assert history[0][1] != history[1][1]  # the model changed between the two
    for step, scores in history:  # what the CSV logger wrote at that step, under eval/
        logged = dict(one_process["logged"][step])
        assert logged.pop("eval/seconds") > 0
        assert logged == pytest.approx({f"eval/{name}": value for name, value in scores.items()}, rel=1e-12)
    assert one_process["training_after"] and one_process["requires_grad"]
    plain = run_here(tmp_path, None, evaluate=False)
    assert plain["steps"] == one_process["steps"]  # losses and learning rates bit for bit
    assert all(torch.equal(plain["weights"][k], w) for k, w in one_process["weights"].items())
    last_generations = one_process["generations_per_rank"][0]
    assert standalone(one_process["weights"], tokenizer_dir) == (history[-1][1], last_generations)


def test_task_set_scores_like_the_eval_command_and_leaves_model_and_random_state_alone(tokenizer_dir):
    import lm_eval

    from moxin_lightning.evaluation.in_loop import flat_scores
    from moxin_lightning.evaluation.lm import MoxinLM
    from moxin_lightning.evaluation.task_sets import resolve_tasks
    from moxin_lightning.model import ModelConfig, Transformer
    from moxin_lightning.tokenizers import load_tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("moxin-tiny-9m", **{**runs.TINY, "vocab_size": runs.VOCAB})).train()
    tokenizer = load_tokenizer(tokenizer_dir)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    task_set = TaskSet("moxin_local", limit=runs.LIMIT, batch_size=runs.BATCH)
    scores = task_set.evaluate(model, tokenizer)
    assert (random.random(), np.random.rand(), torch.rand(1)) == before
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert task_set.evaluate(model, tokenizer) == scores  # the same few-shot draws every time
    manager, built = resolve_tasks(["moxin_local"])
    reference = lm_eval.simple_evaluate(
        model=MoxinLM(model, tokenizer, batch_size=runs.BATCH), tasks=built, task_manager=manager,
        limit=runs.LIMIT, bootstrap_iters=0,
    )  # fmt: skip
    assert flat_scores(reference) == scores


def launch(strategy: str, out: Path, tokenizer: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES}
    command = [sys.executable, "-m", "tests.in_loop_eval_runs", strategy, "2", str(out), str(tokenizer)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    result = json.loads((out / "run.json").read_text())
    result["weights"] = torch.load(out / "run.pt", weights_only=True)
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_score_what_one_process_scores(one_process, tmp_path, tokenizer_dir, strategy):
    two = launch(strategy, tmp_path, tokenizer_dir)
    rank0, rank1 = two["history_per_rank"]
    assert rank0 == rank1  # every rank logs the same scores
    # ... having computed its share of the batches: together what one process computes, split about evenly (each
    # of the 2 evaluations makes 2 log-likelihood passes and 1 generation pass, each split to within a batch)
    one_batches, shares = one_process["batches_per_rank"][0], two["batches_per_rank"]
    for kind, passes in (("score", 4), ("generate", 2)):
        assert shares[0][kind] + shares[1][kind] == one_batches[kind]
        assert abs(shares[0][kind] - shares[1][kind]) <= passes and min(shares[0][kind], shares[1][kind]) > 0
    assert [step for step, _ in rank0] == [3, 6]
    for step, scores in rank0:
        assert {k: v for k, v in two["logged"][str(step)].items() if k != "eval/seconds"} == pytest.approx(
            {f"eval/{name}": value for name, value in scores.items()}, rel=1e-12
        )
    # Against a standalone evaluation of the same final weights: the same scores and greedy generations, exactly.
    scores, generations = standalone(two["weights"], tokenizer_dir)
    assert scores == rank0[-1][1]
    assert two["generations_per_rank"] == [generations, generations] and len(generations) == runs.LIMIT
    # Against the one-process run: its weights differ from these by the reduction order of the gradients (~1e-6),
    # so accuracies are equal and perplexities agree to 1e-6 (measured: 3e-8).
    for (step, scores), (one_step, one_scores) in zip(rank0, one_process["history_per_rank"][0], strict=True):
        assert step == one_step and scores.keys() == one_scores.keys()
        for name, value in scores.items():
            if "perplexity" in name or "bits_per_byte" in name:
                assert value == pytest.approx(one_scores[name], rel=1e-6), name
            else:
                assert value == one_scores[name], name
    assert two["training_after"] and two["requires_grad"]


def test_an_unknown_task_stops_fit_with_one_line_before_any_run_folder(tmp_path, capsys):
    from moxin_lightning.cli import main

    config = write_tiny_fit(
        tmp_path,
        """  max_steps: 4
  callbacks:
    - class_path: moxin_lightning.callbacks.InLoopEvaluation
      init_args: {tasks: [moxin_local_arith_mcq], every_n_steps: 2}
""",
    )
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: unknown task 'moxin_local_arith_mcq'; close names: moxin_local_arith_mc, moxin_local_arith_gen, "
        "moxin_local_text, moxin_local"
    )
    assert not (tmp_path / "run").exists()


def test_bad_settings_are_one_line_errors(tmp_path):
    from moxin_lightning.callbacks import InLoopEvaluation

    cases = [
        (dict(every_n_steps=0), "InLoopEvaluation every_n_steps=0 must be an integer >= 1"),
        (dict(limit=0), "limit=0 must be > 0 (a count, or a fraction below 1)"),
        (dict(tasks=" , "), "tasks is empty; name tasks or groups, e.g. moxin_local"),
        (dict(tokenizer=tmp_path / "nope"), f"InLoopEvaluation tokenizer {tmp_path / 'nope'} does not exist"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as raised:
            InLoopEvaluation(**options)
        assert str(raised.value) == message
