"""Issue 27, item 5: a run resumed with other data settings. Every setting that changes the data
order or the global batch is listed at start-up, and the epoch goes on at the image where it
stopped: a larger batch leaves no image of it unseen, and nothing is seen twice."""
from __future__ import annotations

import pytest

from cli_runs import run_bam, trained_images
from safety_runs import TINY_PRETRAIN

SIGNALLED_STEP = 3  # the signal arrives as step 3 starts: 4 batches of 8 are trained, then it saves
EPOCH_IMAGES = 80  # --data.fraction=0.02 of the 4,000 digits, class-balanced


def run(run_dir, seen, *options):
    return run_bam(["pretrain", *TINY_PRETRAIN, "--data.fraction=0.02", "--trainer.max_epochs=1",
                    f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last",
                    "--trainer.callbacks+=cli_runs.RecordTrainedImages", f"--trainer.callbacks.init_args.path={seen}",
                    *options])


@pytest.mark.process
def test_resuming_with_a_larger_batch_and_other_crops_lists_them_and_uses_each_image_once(tmp_path):
    seen = tmp_path / "seen.txt"
    first = run(tmp_path / "run", seen, "--trainer.callbacks+=cli_runs.SignalAtStep",
                f"--trainer.callbacks.init_args.step={SIGNALLED_STEP}")
    assert first.returncode == 0, first.stdout[-3000:]
    assert f"at step {SIGNALLED_STEP + 1} and stopping" in first.stdout
    before = [index for _, batch in trained_images(seen) for index in batch]
    assert len(before) == (SIGNALLED_STEP + 1) * 8

    second = run(tmp_path / "run", seen, "--data.batch_size=16", "--data.crops.global_size=24")
    assert second.returncode == 0, second.stdout[-3000:]
    listed = second.stdout.split("this run's values are used:\n", 1)[1].split("\nTo continue", 1)[0]
    assert sorted(listed.splitlines()) == ["  data.init_args.batch_size: 16 (checkpoint: 8)",
                                           "  data.init_args.crops.global_size: 24 (checkpoint: 28)"]
    assert ("bam: resuming epoch 0 at image 32 of 80 of its order, saved by 1 process(es) x batch 8 (global 8); "
            "this run: 1 x 16 (global 16), 3 more batches this epoch, none of its images repeated or left out"
            in second.stdout)
    batches = trained_images(seen)
    after = [index for _, batch in batches[len(before) // 8:] for index in batch]
    assert [len(batch) for _, batch in batches[len(before) // 8:]] == [16, 16, 16]
    assert not set(before) & set(after)  # nothing twice
    assert len(set(before) | set(after)) == EPOCH_IMAGES  # nothing left out: the whole epoch, once
