"""ResumableSampler / ResumableDataLoader: the data order is a function of (seed, epoch, rank) and
an epoch can be continued at any batch."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

import scale_worker
from bam.data.resumable import ResumableDataLoader, ResumableSampler

DATASET = TensorDataset(torch.arange(40))


def loader(epoch: int = 0, batch_size: int = 4, **sampler_args) -> ResumableDataLoader:
    sampler = ResumableSampler(DATASET, seed=3, **sampler_args)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(DATASET, batch_size=batch_size, sampler=sampler, drop_last=True)


def indices(batches) -> list[int]:
    return [int(i) for (batch,) in batches for i in batch]


def test_each_process_gets_its_share_of_one_seeded_permutation():
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(3 + 5)).tolist()  # seed + epoch
    shares = []
    for rank in range(4):
        sampler = ResumableSampler(DATASET, seed=3, num_replicas=4, rank=rank)
        sampler.set_epoch(5)
        shares.append(list(sampler))
    assert [shares[rank] for rank in range(4)] == [permutation[rank::4] for rank in range(4)]


def test_without_a_process_group_one_process_gets_everything():
    assert sorted(ResumableSampler(DATASET)) == list(range(40))
    assert len(loader()) == 10


def test_loader_resumes_mid_epoch_at_the_next_batch():
    uninterrupted = list(loader(epoch=2))
    first = loader(epoch=2)
    iterator = iter(first)
    consumed = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 3}

    resumed = loader(epoch=0)  # a fresh process: nothing but the saved state
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # the epoch's length (schedules) is unchanged
    rest = list(resumed)
    assert indices(consumed + rest) == indices(uninterrupted)
    assert resumed.state_dict() == {"epoch": 2, "batches": 10}
    assert indices(resumed) == indices(uninterrupted)  # the skip applies once; the epoch repeats whole


def test_a_new_epoch_drops_a_saved_position():
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 10})  # saved at the end of epoch 1
    resumed.sampler.set_epoch(2)  # what Lightning does when the next epoch starts
    assert indices(resumed) == indices(loader(epoch=2))


def test_loader_needs_a_resumable_sampler():
    with pytest.raises(ValueError, match="ResumableSampler"):
        ResumableDataLoader(DATASET, batch_size=4, shuffle=True)


def test_resume_from_an_end_of_epoch_checkpoint_starts_the_next_epoch(tmp_path, monkeypatch):
    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    _, _, uninterrupted = scale_worker.train("vit", tmp_path / "full")
    original = scale_worker.make_trainer
    with monkeypatch.context() as patch:  # the first half stops after epoch 0 (checkpoint: its end)
        patch.setattr(scale_worker, "make_trainer", lambda run_dir, devices, num_nodes, callbacks: original(
            run_dir, devices, num_nodes, [*callbacks, StopAfterFirstEpoch()]))
        scale_worker.train("vit", tmp_path / "split")
    _, _, resumed = scale_worker.train("vit", tmp_path / "split", ckpt_path="last")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-12)
