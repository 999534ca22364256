"""Exact resume through the `bam pretrain` command: a run stopped by SIGTERM mid-epoch and resumed
with `--ckpt_path last` logs, step for step, the losses of the run that was never interrupted, on
both augmentation paths (random crops, blur; CPU workers or batched on the device)."""
from __future__ import annotations

import pytest
import torch

from bam.data import BuiltinDataModule, MultiCropConfig
from bam.data.seeding import SeededSamples, batch_seed, sample_seed, seeded_random
from cli_runs import DEMO_STEPS, logged_losses, pretrain

INTERRUPTED_STEP = 8  # the signal arrives during the 3rd batch of epoch 1


DEVICE, CPU_WORKERS = ["--data.init_args.augment_on=device"], ["--data.init_args.augment_on=cpu", "--data.init_args.num_workers=2"]


@pytest.mark.process
@pytest.mark.slow
# each method once, each augmentation path at least twice (BAM's device path is the others' and needs no own run)
@pytest.mark.parametrize("config,path_options", [("demo", CPU_WORKERS), ("dino_demo", DEVICE),
                                                ("deepclusterv2_demo", DEVICE), ("sela_demo", DEVICE), ("sela_v2_demo", CPU_WORKERS)],
                         ids=["cpu-workers", "dino-device", "deepclusterv2-device", "sela-device", "sela-v2-cpu-workers"])
def test_sigterm_then_ckpt_path_last_logs_the_uninterrupted_losses(tmp_path, config, path_options):
    """Each method's state beyond the networks is in the checkpoint: DINO's centre; DeepCluster-v2's
    bank, prototypes and clusters (which a run resumed mid-epoch must not recompute); SeLa's labels and
    bank (re-optimised at steps 1-10 of the 12 by sela_demo, at epoch 1's start by sela_v2_demo)."""
    full = pretrain(tmp_path / "full", *path_options, config=config)
    assert full.returncode == 0, full.stdout[-3000:]
    uninterrupted = logged_losses(tmp_path / "full")
    assert sorted(uninterrupted) == list(range(DEMO_STEPS))

    split = tmp_path / "split"
    command = [*path_options, "--ckpt_path=last", "--trainer.callbacks+=cli_runs.SignalAtStep",
               f"--trainer.callbacks.init_args.step={INTERRUPTED_STEP}"]
    first = pretrain(split, *command, config=config)
    assert first.returncode == 0, first.stdout[-3000:]
    assert f"at step {INTERRUPTED_STEP + 1} and stopping" in first.stdout
    assert max(logged_losses(split)) == INTERRUPTED_STEP  # the interrupted step's row is there

    second = pretrain(split, *command, config=config)  # the same command again resumes
    assert second.returncode == 0, second.stdout[-3000:]
    resumed = logged_losses(split)
    assert sorted(resumed) == list(range(DEMO_STEPS))  # every step once, the interrupted one included
    for step in range(DEMO_STEPS):
        assert resumed[step] == uninterrupted[step], f"step {step}: {resumed[step]} != {uninterrupted[step]}"


# -- the seeding itself ------------------------------------------------------------------------
def _module(augment_on: str, num_workers: int = 0) -> BuiltinDataModule:
    crops = MultiCropConfig(global_size=16, local_size=8, num_local_crops=2)
    return BuiltinDataModule("synthetic", options=dict(num_classes=4, image_size=24, train_size=32, val_size=8),
                             crops=crops, augment_on=augment_on, batch_size=8, num_workers=num_workers, seed=5)


def test_cpu_path_views_depend_on_seed_epoch_and_index_only():
    module = _module("cpu")
    loader = module.train_dataloader()
    dataset = loader.dataset
    assert isinstance(dataset, SeededSamples)
    first = dataset[(1, 3)]
    torch.rand(100)  # draws in between (another sample, the model) change nothing
    dataset[(1, 4)]
    again = dataset[(1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    other_epoch = dataset[(2, 3)]
    assert not all(torch.equal(a, b) for a, b in zip(first[0], other_epoch[0]))
    with seeded_random(sample_seed(5, 1, 3)):  # the documented seed: (data seed, epoch, index)
        expected = dataset.dataset[3]
    assert all(torch.equal(a, b) for a, b in zip(first[0], expected[0]))


def test_cpu_path_batches_do_not_depend_on_the_workers():
    batches = []
    for workers in (0, 2):
        module = _module("cpu", num_workers=workers)
        loader = module.train_dataloader()
        loader.sampler.set_epoch(1)
        batches.append([views for views, _, _ in loader])
    for single, parallel in zip(*batches):
        assert all(torch.equal(a, b) for a, b in zip(single, parallel))


def test_seeded_random_restores_the_process_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_random(123):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_random(123):
        assert torch.equal(torch.rand(3), inside)


def test_device_path_batch_is_seeded_by_epoch_and_indices():
    module = _module("device")
    images, labels, indices = next(iter(module.train_dataloader()))
    views = module.on_after_batch_transfer((images, labels, indices), 0)[0]
    torch.rand(100)
    again = module.on_after_batch_transfer((images, labels, indices), 0)[0]
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    with seeded_random(batch_seed(5, 0, indices)):  # no trainer: epoch 0
        expected = module.device_augment(images)
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    with seeded_random(batch_seed(5, 1, indices)):
        other_epoch = module.device_augment(images)
    assert not all(torch.equal(a, b) for a, b in zip(views, other_epoch))


def test_keyed_sampler_yields_the_epoch_with_the_same_order_and_skip():
    from bam.data.resumable import ResumableSampler

    plain, keyed = ResumableSampler(range(20), seed=3), ResumableSampler(range(20), seed=3, keyed=True)
    for sampler in (plain, keyed):
        sampler.set_epoch(4)
        sampler.start = 5  # a resumed epoch
    assert list(keyed) == [(4, index) for index in plain]
