"""DPO's cached reference over a prepared preference folder: the table `reference: cache` writes holds, at each
pair's `pair_index`, the frozen starting model's log-probs of that pair (train and val splits), and a second run
over the same folder and starting weights reuses the file instead of scoring again."""

from __future__ import annotations

import torch

from moxin_lightning.data.prepare import prepare
from moxin_lightning.datamodules.preference import PadPairs, PreferenceData
from moxin_lightning.datamodules.records import Positions
from moxin_lightning.tasks import DPO
from tests.test_dpo_task import TINY, dpo, fit
from tests.test_preference_data import EOS, ByteTokenizer, MiniTemplate, pairs, write_jsonl

MAX_LENGTH = 48
MODEL = {**TINY, "vocab_size": ByteTokenizer.vocab_size}


def preference_data(folder, **kwargs) -> PreferenceData:
    settings = dict(tokenizer=ByteTokenizer(), template=MiniTemplate(), batch_size=4, shuffle=True, seed=3)
    return PreferenceData([str(folder)], **{**settings, **kwargs})


def reference_table(data: PreferenceData, split: str) -> torch.Tensor:
    """(pairs, 2) summed response log-probs of chosen and rejected under the starting weights, pair by pair."""
    model = dpo(model_overrides=MODEL).build_model(trainable=False)
    rows = []
    with torch.no_grad():
        for item in Positions(data.streams[split]):
            chosen, rejected, _, _ = DPO.pair_logps(model, PadPairs(EOS)([item]))
            rows.append([chosen.item(), rejected.item()])
    return torch.tensor(rows)


def test_cached_reference_of_prepared_pairs_is_the_frozen_models_by_pair_index_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "moxin-cache"))
    records = write_jsonl(tmp_path / "pairs.jsonl", pairs(20))
    options = dict(format="preference", template=MiniTemplate(), max_length=MAX_LENGTH, num_workers=1)
    folder = prepare([str(records)], ByteTokenizer(), tmp_path / "prepared", val_fraction=0.25, **options)
    cache = tmp_path / "reference"

    data = preference_data(folder)
    task = dpo(reference="cache", cache_dir=str(cache), model_overrides=MODEL)
    fit(task, data, steps=2)
    counts = {split: data.pair_count(split) for split in ("train", "val")}
    assert counts["train"] + counts["val"] == 20 and counts["val"] > 0
    files = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.glob("*.pt")}
    assert len(files) == 2  # one table per split: their fingerprints differ
    on_disk = [torch.load(cache / name, weights_only=True) for name in files]
    for split, count in counts.items():
        expected = reference_table(data, split)
        assert len({tuple(row) for row in expected.tolist()}) == count  # every pair's row differs: a wrong index shows
        table = task._cached[split]
        assert table.shape == (count, 2)
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-5)  # row i: the pair whose pair_index is i
        assert sum(torch.equal(table, stored) for stored in on_disk) == 1

    # the same folder and starting weights, read with other batching and order: the same keys, nothing rescored
    again = preference_data(folder, batch_size=3, seed=11)
    assert [again.split_fingerprint(split) for split in counts] == [data.split_fingerprint(split) for split in counts]
    task = dpo(reference="cache", cache_dir=str(cache), model_overrides=MODEL)
    fit(task, again, steps=1)
    assert {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.glob("*.pt")} == files
    for split in counts:
        torch.testing.assert_close(task._cached[split], reference_table(data, split), rtol=0, atol=1e-5)
