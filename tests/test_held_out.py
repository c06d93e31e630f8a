"""Validation on several processes is the one-process pass, shared (`moxin_lightning.data.held_out`): every process
makes the whole pass whatever litdata hands its rank, takes batches rank, rank + W, ..., padded to as many steps as
process 0 with marked batches that weigh nothing in the loss and in what the task logs. Here in one process, one
share at a time; tests/test_fit_nodes.py runs the README's job on 2 "nodes" through torchrun and SLURM variables."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from litdata.streaming import dataset as litdata_dataset
from litdata.utilities.env import _DistributedEnv
from torchmetrics import MeanMetric

from moxin_lightning.data.held_out import PADDING, Share, is_padding, share
from moxin_lightning.datamodules import ChatData, PretrainData
from moxin_lightning.tasks import Pretrain
from tests.distributed_runs import TINY
from tests.prepared_data import write_dataset
from tests.test_chat_data import tokenizer  # noqa: F401  (the module-scoped fixture: a 400-piece BPE)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """200 training and 20 held-out documents (~900 tokens): the held-out split is one chunk."""
    return write_dataset(tmp_path_factory.mktemp("data") / "a", 0, 200)


def pretrain_data(folder, **kwargs) -> PretrainData:
    return PretrainData([str(folder)], **{"seq_len": 16, "batch_size": 2, "val_batches": 5, **kwargs})


def same_batch(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def unmarked(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != PADDING}


def test_share_takes_every_wth_batch_and_pads_to_process_0s_count():
    assert share(5, 0, 2) == ([0, 2, 4], 0)
    assert share(5, 1, 2) == ([1, 3, 3], 1)  # padded with its own last batch
    assert share(1, 1, 3) == ([0], 1)  # nothing of its own: batch 0, as padding
    assert share(6, 2, 3) == ([2, 5], 0)
    assert share(0, 1, 2) == ([], 0)
    assert share(4, 0, 1) == ([0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match="rank 2 is not a process of 2"):
        share(4, 2, 2)
    batches = [{"x": torch.tensor(i)} for i in (1, 3, 3)]
    assert [(int(b["x"]), is_padding(b)) for b in Share(batches, 3, 1)] == [(1, False), (3, False), (3, True)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_the_shares_of_every_process_make_the_one_process_pass_once(data_dir, world_size):
    """5 batches on 2, 3 or 4 processes: each process has ceil(5 / W) steps, its real batches are the pass's
    batches rank, rank + W, ... and the rest are marked padding; together they are each batch once."""
    whole = list(pretrain_data(data_dir).val_dataloader())
    assert len(whole) == 5 and not any(is_padding(batch) for batch in whole)
    seen = []
    for rank in range(world_size):
        mine = list(pretrain_data(data_dir).held_out(rank, world_size))
        assert len(mine) == -(-5 // world_size)
        real = [batch for batch in mine if not is_padding(batch)]
        assert all(is_padding(batch) for batch in mine[len(real) :])  # padding comes last
        for position, batch in zip(range(rank, 5, world_size), real, strict=True):
            assert same_batch(batch, whole[position])
            seen.append(position)
    assert sorted(seen) == list(range(5))


def test_the_pass_is_the_whole_held_out_split_whatever_litdata_gives_this_rank(data_dir, monkeypatch):
    """With litdata seeing rank 1 of 2 (as under DDP), iterating the held-out split gives this rank part of it (its
    one chunk goes to the other rank), but the validation pass is still the one-process pass."""
    alone = pretrain_data(data_dir).validation_pass()
    monkeypatch.setattr(litdata_dataset._DistributedEnv, "detect", classmethod(lambda cls: _DistributedEnv(2, 1, 1)))
    split = litdata_dataset.StreamingDataset(str(data_dir / "val"))
    assert len(list(split)) < 20  # what a litdata loader would give rank 1 of the 20 held-out documents
    as_rank_1 = pretrain_data(data_dir).validation_pass()
    assert len(as_rank_1) == len(alone) == 5
    assert all(same_batch(a, b) for a, b in zip(as_rank_1, alone, strict=True))


def test_padding_weighs_nothing_so_the_shared_loss_is_the_one_process_loss(data_dir):
    """The token-weighted loss of each process's share (the MeanMetric states, which torchmetrics sums over the
    processes) adds up to the one-process loss on 1, 2 and 3 processes, although the padding batches ran."""
    task = Pretrain(preset="moxin-tiny-9m", model_overrides=TINY)
    task.configure_model()
    task.eval()

    def shared_loss(world_size: int) -> tuple[float, float]:
        value = weight = 0.0
        with torch.no_grad():
            for rank in range(world_size):
                metric = MeanMetric()
                for batch in pretrain_data(data_dir).held_out(rank, world_size):
                    task._evaluate(batch, metric)
                assert metric.update_count == -(-5 // world_size)  # every step updates, padding with weight 0
                value, weight = value + float(metric.mean_value), weight + float(metric.weight)
        return value / weight, weight

    one, tokens = shared_loss(1)
    assert tokens == sum(int((b["labels"] != -100).sum()) for b in pretrain_data(data_dir).validation_pass())
    for world_size in (2, 3):
        loss, weight = shared_loss(world_size)
        assert weight == tokens
        assert loss == pytest.approx(one, rel=1e-6)


class Probe(Pretrain):
    """Pretrain that also logs the first input id of each validation batch (what DPO's and GRPO's statistics do)."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val/first_id", batch["input_ids"][0, 0].float())


def test_a_padding_batch_counts_for_nothing_in_what_the_task_logs(data_dir):
    """Lightning validates a share whose padding batch differs from the real ones: val/loss and a metric the task
    logs itself are those of the real batches alone."""
    real = pretrain_data(data_dir).validation_pass()[:2]
    other = pretrain_data(data_dir).validation_pass()[4]
    other = {**other, "input_ids": other["input_ids"].clone()}
    other["input_ids"][0, 0] = 250  # no document holds an id above 199
    first_ids = [float(batch["input_ids"][0, 0]) for batch in real]
    task = Probe(preset="moxin-tiny-9m", model_overrides=TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (padded_run,) = trainer.validate(task, dataloaders=Share([*real, other], 3, 1), verbose=False)
    (alone,) = trainer.validate(task, dataloaders=Share(real, 2, 0), verbose=False)
    assert padded_run["val/first_id"] == alone["val/first_id"] == pytest.approx(sum(first_ids) / 2)
    assert padded_run["val/loss"] == pytest.approx(alone["val/loss"], rel=1e-6)
    mixed = Share([*real, unmarked(other)], 3, 0)  # the same batch unmarked moves both
    (counted,) = trainer.validate(task, dataloaders=mixed, verbose=False)
    assert counted["val/first_id"] == pytest.approx((sum(first_ids) + 250) / 3)
    assert counted["val/loss"] != pytest.approx(alone["val/loss"], rel=1e-4)


def test_record_validation_shares_the_one_process_batches_too(tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """ChatData's held-out records: the one-process batches of batch_size records, rank r of 3 taking batches r,
    r + 3, ... and padding to process 0's count (Lightning's sampler would have repeated records instead)."""
    monkeypatch.setenv("MOXIN_CACHE", str(tmp_path / "cache"))
    data = ChatData(["builtin-chat:arithmetic?count=60"], tokenizer=tokenizer, val_fraction=0.25, batch_size=3)
    data.setup("fit")
    records = data.count("val")
    whole = list(data.val_dataloader())
    assert len(whole) == -(-records // 3) >= 4 and not any(is_padding(batch) for batch in whole)
    seen = []
    for rank in range(3):
        mine = list(data.held_out("val", rank, 3))
        assert len(mine) == -(-len(whole) // 3)
        real = [batch for batch in mine if not is_padding(batch)]
        for position, batch in zip(range(rank, len(whole), 3), real, strict=True):
            assert same_batch(batch, whole[position])
            seen.append(position)
        assert all(same_batch(unmarked(pad), mine[len(real) - 1] if real else whole[0]) for pad in mine[len(real) :])
    assert sorted(seen) == list(range(len(whole)))
