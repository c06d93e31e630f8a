"""lm-evaluation-harness integration: MoxinLM against direct forwards and lm-eval's own HFLM, the shipped task
sets, and the `eval` command end to end, on a tiny random model with a small SentencePiece tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from moxin_lightning.cli import main  # noqa: E402
from moxin_lightning.evaluation import local_data, task_sets  # noqa: E402
from moxin_lightning.evaluation.command import hf_lm  # noqa: E402
from moxin_lightning.evaluation.lm import MoxinLM  # noqa: E402
from moxin_lightning.generate import generate  # noqa: E402
from moxin_lightning.hf import export_hf  # noqa: E402
from moxin_lightning.model import ModelConfig, Transformer  # noqa: E402
from moxin_lightning.tokenizers import SentencePieceTokenizer  # noqa: E402
from moxin_lightning.tokenizers.train import train_tokenizer  # noqa: E402

PARAGRAPHS = list(local_data.local_dataset("text.txt")["test"]["text"])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    """A 400-piece BPE trained in milliseconds on the local task texts."""
    questions = [record["question"] for record in local_data.arithmetic_records()]
    folder = train_tokenizer(iter(PARAGRAPHS + questions), 400, tmp_path_factory.mktemp("tok"), progress=False)
    return SentencePieceTokenizer(folder)


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, sliding_window=24,
        max_seq_len=256,
    )  # fmt: skip
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def release(model, tokenizer, tmp_path_factory):
    return export_hf(model, tmp_path_factory.mktemp("release") / "m", tokenizer)


@pytest.fixture(scope="module")
def hf(release):
    return hf_lm(release, batch_size=3, max_length=48)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, arg, index) for index, arg in enumerate(args)]


PAIRS = [
    ("Question: How many muffins are left?\nAnswer:", " 12"),
    ("A list keeps its items in order. ", "Indexing starts at zero."),  # trailing space moves to the continuation
    ("Files should be opened with", " a with statement, so they are closed."),
    (PARAGRAPHS[7], " Perplexity is the exponential of that average."),  # longer than max_length: cut on the left
]


def test_loglikelihood_equals_a_direct_forward_on_the_same_tokens(model, tokenizer):
    lm = MoxinLM(model, tokenizer, batch_size=3, max_length=48)
    got = lm.loglikelihood(requests("loglikelihood", [*PAIRS, ("", "Paris is a city")]), disable_tqdm=True)
    for (context, continuation), (score, _) in zip([*PAIRS, ("", "Paris is a city")], got, strict=True):
        stripped = context.rstrip()
        moved = context[len(stripped) :]
        context_ids = tokenizer.encode(stripped, bos=True) if context else [tokenizer.bos_id]
        whole = tokenizer.encode(stripped + moved + continuation, bos=True) if context else None
        target = whole[len(context_ids) :] if context else tokenizer.encode(continuation)
        window = (context_ids + target)[-49:]
        with torch.no_grad():
            logprobs = model(torch.tensor([window[:-1]])).float().log_softmax(-1)[0]
        expected = sum(logprobs[len(window) - 1 - len(target) + i, t].item() for i, t in enumerate(target))
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(tokenizer.encode(PARAGRAPHS[7])) > 48  # the truncation case really is one


def test_greedy_flag_is_true_exactly_for_the_argmax_continuation(model, tokenizer):
    lm = MoxinLM(model, tokenizer)
    context = tokenizer.encode("A dictionary maps keys to values.", bos=True)
    greedy = generate(model, [context], 4)[0]
    other = greedy[:3] + [(greedy[3] + 1) % tokenizer.vocab_size]
    scores = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)], disable_tqdm=True)
    assert [flag for _, flag in scores] == [True, False]
    assert scores[0][0] > scores[1][0]


def test_scores_generations_and_perplexities_match_lm_evals_hflm(model, tokenizer, hf):
    lm = MoxinLM(model, tokenizer, batch_size=2, max_length=48)
    ids = tokenizer.encode("A list keeps its items.", bos=True)
    assert lm.tok_encode("A list keeps its items.") == hf.tok_encode("A list keeps its items.") == ids
    assert lm.tok_encode("<s>A list keeps its items.") == ids  # a spelled-out BOS is the BOS, not a second one
    ours = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = hf.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert [flag for _, flag in ours] == [flag for _, flag in theirs]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-4)

    texts = [(PARAGRAPHS[0],), (PARAGRAPHS[8],), ("Short text.",)]  # 2+ windows of 48 tokens, and one
    ours = lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    theirs = hf.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)
    short = [tokenizer.bos_id] + tokenizer.encode("Short text.", bos=True)  # HFLM's convention: BOS, then BOS + text
    with torch.no_grad():
        logprobs = model(torch.tensor([short[:-1]])).log_softmax(-1)[0]
    assert ours[2] == pytest.approx(sum(logprobs[i, t].item() for i, t in enumerate(short[1:])), abs=1e-5)

    asks = [(f"Question: {q}\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}) for q in ("What is 2 + 3?", "Why?")]
    assert lm.generate_until(requests("generate_until", asks), disable_tqdm=True) == hf.generate_until(
        requests("generate_until", asks), disable_tqdm=True
    )


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(model, tokenizer):
    lm = MoxinLM(model, tokenizer, batch_size=2)
    prompts = ["A generator function uses", "Sorting a list of records"]
    full = [tokenizer.decode(t) for t in generate(model, [tokenizer.encode(p, bos=True) for p in prompts], 10)]
    stops = [text[3:5] for text in full]  # a stop string that really occurs, after the third character
    asks = [(p, {"until": [stop], "max_gen_toks": 10}) for p, stop in zip(prompts, stops, strict=True)]
    got = lm.generate_until(requests("generate_until", asks), disable_tqdm=True)
    assert got == [text.split(stop)[0] for text, stop in zip(full, stops, strict=True)]
    assert all(len(text) < len(whole) for text, whole in zip(got, full, strict=True))
    hot = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 5.0}
    sampled = lm.generate_until(requests("generate_until", [(prompts[0], hot)]), disable_tqdm=True)
    assert sampled[0] != full[0]


def test_generation_stops_early_once_a_stop_string_appears_and_segments_join_exactly(model, tokenizer, monkeypatch):
    import moxin_lightning.evaluation.lm as lm_module

    calls = []

    def counted(model_, prompts, max_new_tokens, **kwargs):
        calls.append((len(prompts), max_new_tokens))
        return generate(model_, prompts, max_new_tokens, **kwargs)

    monkeypatch.setattr(lm_module, "generate", counted)
    lm = MoxinLM(model, tokenizer)
    prompt = "Unit tests check one small piece"
    full = tokenizer.decode(generate(model, [tokenizer.encode(prompt, bos=True)], 70)[0])
    never, early = "\x00", full[2:4]
    assert lm.generate_until(requests("generate_until", [(prompt, {"until": [never], "max_gen_toks": 70})])) == [full]
    assert calls == [(1, 32), (1, 32), (1, 6)]  # three segments, re-prefilled, join into the one-call text
    calls.clear()
    got = lm.generate_until(requests("generate_until", [(prompt, {"until": [early], "max_gen_toks": 70})]))
    assert got == [full.split(early)[0]] and calls == [(1, 32)]  # stopped after the first segment


def test_create_from_arg_string_loads_the_checkpoint(model, tokenizer, release):
    lm = MoxinLM.create_from_arg_string(f"checkpoint={release},batch_size=2,max_length=48", {"device": "cpu"})
    reference = MoxinLM(model, tokenizer, batch_size=2, max_length=48)  # same batches: bit-identical scores
    args = requests("loglikelihood", PAIRS)
    assert lm.batch_size == 2 and lm.tokenizer.fingerprint == tokenizer.fingerprint
    assert lm.loglikelihood(args, disable_tqdm=True) == reference.loglikelihood(args, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"^batch_size='auto' must be a positive integer"):
        MoxinLM(model, tokenizer, batch_size="auto")


def test_shipped_arithmetic_data_is_what_the_generator_writes():
    records = local_data.arithmetic_records()
    shipped = (local_data.DATA_DIR / "arithmetic.jsonl").read_text()
    assert shipped == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    assert [sum(r["split"] == s for r in records) for s in ("train", "test")] == [8, 40]
    assert all(r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == 4 for r in records)
    dataset = local_data.local_dataset("arithmetic.jsonl", version=1.0)
    assert (len(dataset["train"]), len(dataset["test"])) == (8, 40)
    assert len(local_data.local_dataset("text.txt")["test"]) == len(PARAGRAPHS) == 12


def test_eval_command_writes_the_harness_results_and_both_backends_agree(model, tokenizer, release, tmp_path, capsys):
    outputs = {}
    for backend in ("moxin", "hf"):
        outputs[backend] = tmp_path / f"{backend}.json"
        main(["eval", "--checkpoint", str(release), "--tasks", "moxin_local", "--limit", "12", "--backend", backend,
              "--batch_size", "4", "--output", str(outputs[backend]), "--bootstrap_iters", "0"])  # fmt: skip
        table = capsys.readouterr().out
        assert "moxin_local_arith_mc" in table and "word_perplexity" in table
    ours, theirs = (json.loads(outputs[b].read_text()) for b in ("moxin", "hf"))
    assert list(tmp_path.glob(".*tmp*")) == []
    assert ours["n-samples"] == {
        "moxin_local_arith_mc": {"original": 40, "effective": 12},
        "moxin_local_arith_gen": {"original": 40, "effective": 12},
        "moxin_local_text": {"original": 12, "effective": 12},
    }
    assert ours["n-shot"] == {"moxin_local_arith_mc": 0, "moxin_local_arith_gen": 3, "moxin_local_text": 0}
    for task, metrics in ours["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs["results"][task][key], rel=1e-5), (task, key)

    # The numbers themselves, recomputed from MoxinLM's scores outside the harness.
    lm = MoxinLM(model, tokenizer)
    docs = local_data.local_dataset("arithmetic.jsonl")["test"].select(range(12))
    asks = [(f"Question: {d['question']}\nAnswer:", f" {c}") for d in docs for c in d["choices"]]
    scores = [s for s, _ in lm.loglikelihood(requests("loglikelihood", asks), disable_tqdm=True)]
    picks = [max(range(4), key=lambda c: scores[4 * i + c]) for i in range(12)]
    lengths = [[len(c) for c in d["choices"]] for d in docs]  # lm-eval's acc_norm: per character of the choice
    picks_norm = [max(range(4), key=lambda c: scores[4 * i + c] / lengths[i][c]) for i in range(12)]
    mc = ours["results"]["moxin_local_arith_mc"]
    assert mc["acc,none"] == pytest.approx(sum(p == d["label"] for p, d in zip(picks, docs, strict=True)) / 12)
    assert mc["acc_norm,none"] == pytest.approx(
        sum(p == d["label"] for p, d in zip(picks_norm, docs, strict=True)) / 12
    )
    totals = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(p,) for p in PARAGRAPHS]), disable_tqdm=True)
    words = sum(len(p.split()) for p in PARAGRAPHS)
    assert words == 587
    text = ours["results"]["moxin_local_text"]
    assert text["word_perplexity,none"] == pytest.approx(math.exp(-sum(totals) / words), rel=1e-6)
    assert text["bits_per_byte,none"] == pytest.approx(
        -sum(totals) / sum(len(p.encode()) for p in PARAGRAPHS) / math.log(2), rel=1e-6
    )
    assert ours["config"]["model"] == "moxin" and ours["config"]["model_args"]["checkpoint"] == str(release)


def test_default_output_sits_beside_the_checkpoint(release, tmp_path, capsys):
    main(
        [
            "eval",
            "--checkpoint",
            str(release),
            "--tasks",
            "moxin_local_arith_mc",
            "--limit",
            "2",
            "--bootstrap_iters",
            "0",
        ]
    )
    before = sorted(path.name for path in release.iterdir())
    beside = release.resolve().with_name(release.name + "-eval") / "moxin-moxin_local_arith_mc.json"
    written = json.loads(beside.read_text())
    assert written["n-samples"]["moxin_local_arith_mc"] == {"original": 40, "effective": 2}
    assert "wrote " + str(beside) in capsys.readouterr().err
    assert sorted(path.name for path in release.iterdir()) == before  # the release itself is left as promoted


def test_input_errors_are_one_line_and_exit_2(release, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--tasks", "moxin_local"],
         f"error: checkpoint {tmp_path / 'nope'} does not exist; pass a release or HF folder, a .ckpt file or a "
         "sharded checkpoint folder"),
        (["--checkpoint", str(release), "--tasks", " , "],
         "error: --tasks is empty; name tasks or groups, e.g. --tasks moxin_local"),
        (["--checkpoint", str(release), "--tasks", "moxin_local_arith_mcq"],
         "error: unknown task 'moxin_local_arith_mcq'; close names: moxin_local_arith_mc, moxin_local_arith_gen, "
         "moxin_local_text, moxin_local"),
        (["--checkpoint", str(release), "--tasks", "moxin_local", "--output", str(tmp_path)],
         f"error: --output {tmp_path} is a folder; give a file name such as {tmp_path / 'results.json'}"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["eval", *argv])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]


def test_a_hub_dataset_that_is_not_cached_is_named_with_the_fix(release, tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--checkpoint", str(release), "--tasks", "arc_easy"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: task 'arc_easy' needs dataset 'allenai/ai2_arc' from the Hugging Face Hub, which is not in the local "
        "cache; run once with network access (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or evaluate the "
        "offline task set --tasks moxin_local"
    ]
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(release), "--tasks", "hellaswagg"])
    assert capsys.readouterr().err.startswith("error: unknown task 'hellaswagg'; close names: hellaswag")


def test_moxin_s_reported_settings_resolve_with_their_few_shot_counts(monkeypatch):
    """The Hub groups, built without their datasets: each task keeps the shot count of Moxin's tables."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.task import TaskConfig

    def config_only(self, data_dir=None, cache_dir=None, download_mode=None, config=None):
        self._config = TaskConfig(**config)

    monkeypatch.setattr(ConfigurableTask, "__init__", config_only)
    manager = task_sets.task_manager(with_hub=True)
    shots = {}
    for group in ("moxin_fewshot", "moxin_zeroshot"):
        loaded = manager.load([group])
        shots[group] = {name: task.get_config("num_fewshot") for name, task in loaded["tasks"].items()}
    fewshot = shots["moxin_fewshot"]
    mmlu = {name: n for name, n in fewshot.items() if name.startswith("mmlu_")}
    assert len(mmlu) == 57 and set(mmlu.values()) == {5}
    assert {k: v for k, v in fewshot.items() if k not in mmlu} == {
        "arc_challenge": 25,
        "hellaswag": 10,
        "winogrande": 5,
    }
    assert shots["moxin_zeroshot"] == {"hellaswag": 0, "winogrande": 0, "piqa": 0, "arc_easy": 0, "arc_challenge": 0}


def test_local_tasks_resolve_without_lm_evals_index():
    manager, built = task_sets.resolve_tasks(["moxin_local"])
    assert manager is task_sets.task_manager(with_hub=False)
    assert sorted(task.task_name for task in built[0].get_all_tasks()) == [
        "moxin_local_arith_gen", "moxin_local_arith_mc", "moxin_local_text"
    ]  # fmt: skip
