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
    assert state == {"epoch": 2, "samples": 12, "world_size": 1, "batch_size": 4}

    resumed = loader(epoch=0)  # a fresh process: nothing but the saved state
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # the epoch's length (schedules) is unchanged
    rest = list(resumed)
    assert indices(consumed + rest) == indices(uninterrupted)
    assert resumed.state_dict() == {"epoch": 2, "samples": 40, "world_size": 1, "batch_size": 4}
    assert indices(resumed) == indices(uninterrupted)  # the skip applies once; the epoch repeats whole


def _consume(loaders: list[ResumableDataLoader], batches: int) -> tuple[list[int], dict]:
    """The indices the processes of a run (one loader each) train on in `batches` steps, and the
    position each saves (the same on every process)."""
    iterators = [iter(each) for each in loaders]
    used = [int(i) for iterator in iterators for _ in range(batches) for i in next(iterator)[0]]
    states = [each.state_dict() for each in loaders]
    assert all(state == states[0] for state in states)
    return used, states[0]


@pytest.mark.parametrize("before, after", [((2, 4), (1, 4)), ((1, 4), (2, 4)), ((1, 4), (1, 8)), ((2, 8), (1, 4))],
                         ids=["2->1 processes", "1->2 processes", "batch 4->8", "2x8->1x4"])
def test_a_resume_with_other_processes_or_batches_goes_on_at_the_same_image(before, after):
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    (world, batch), (new_world, new_batch) = before, after
    used, state = _consume([loader(2, batch, num_replicas=world, rank=rank) for rank in range(world)], 2)
    assert state == {"epoch": 2, "samples": 2 * batch * world, "world_size": world, "batch_size": batch}
    assert sorted(used) == sorted(permutation[: len(used)])

    resumed = [loader(0, new_batch, num_replicas=new_world, rank=rank) for rank in range(new_world)]
    for each in resumed:
        each.load_state_dict(state)
    per_process = (40 - len(used)) // new_world // new_batch * new_batch  # whole batches, as every epoch
    # the batches a trainer counts as done: its count then ends the epoch when the data does
    assert [each.batches_done() for each in resumed] == [len(each) - per_process // new_batch for each in resumed]
    rest = [int(i) for each in resumed for (batch_,) in each for i in batch_]
    assert not set(rest) & set(used)  # nothing seen twice
    assert sorted(rest) == sorted(permutation[len(used): len(used) + per_process * new_world])  # nothing skipped


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
