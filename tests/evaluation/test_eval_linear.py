"""`bam linear`: the stage at toy size (command line, report, checkpoint, resume) and cached features
training the head exactly as on-the-fly features of un-augmented images do."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from bam.evaluation.data import BuiltinClassificationData
from bam.evaluation.linear import LinearProbe, main
from eval_fixtures import CNN, VIT, synthetic_args, synthetic_data, trainer_args, write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("linear")
    return {"cnn": write_checkpoint(directory, *CNN), "vit": write_checkpoint(directory, *VIT)}


def test_vit_probe_runs_reports_and_resumes(checkpoints, tmp_path):
    args = ["--model.backbone", str(checkpoints["vit"]), "--model.n_last_blocks", "2", *synthetic_args()]
    main([*args, *trainer_args(tmp_path, max_epochs=1)])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(key.startswith("extractor.") for key in saved["state_dict"])  # the frozen backbone is not stored
    assert saved["state_dict"]["head.1.weight"].shape == (4, 3 * 48)  # 2 class tokens + mean patch token
    main([*args, *trainer_args(tmp_path, max_epochs=2), "--ckpt_path", "last"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["epoch"] for entry in results["history"]] == [1, 2]  # the resumed run kept epoch 1
    best, last = results["val"], results["history"][-1]
    assert best["last_top1"] == last["val/top1"] and best["last_epoch"] == 2
    assert best["best_top1"] == max(entry["val/top1"] for entry in results["history"])
    assert 0 <= best["best_top1"] <= best["best_top5"] <= 100


def test_misspelt_config_key_is_rejected_by_name(checkpoints, tmp_path, capsys):
    config = tmp_path / "probe.yaml"
    config.write_text(f"model:\n  backbone: {checkpoints['cnn']}\n  n_last_block: 2\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config), *synthetic_args(), *trainer_args(tmp_path)])
    assert "n_last_block" in capsys.readouterr().err


def train_head(backbone: str, cache_features: bool, run_dir) -> tuple[LinearProbe, BuiltinClassificationData]:
    pl.seed_everything(0)
    model = LinearProbe(backbone, num_classes=4, cache_features=cache_features, lr=0.5)
    data = synthetic_data(batch_size=16, augment="none")
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir,
    )
    trainer.fit(model, data)
    return model, data


def test_cached_features_train_the_head_as_on_the_fly_features(checkpoints, tmp_path):
    on_the_fly, _ = train_head(str(checkpoints["cnn"]), cache_features=False, run_dir=tmp_path / "images")
    cached, data = train_head(str(checkpoints["cnn"]), cache_features=True, run_dir=tmp_path / "features")
    assert len(data.cache["train"]) == 64 and len(data.cache["val"]) == 32
    assert on_the_fly.history == cached.history
    moved = on_the_fly.head[1].weight.abs().max() > 0.05  # far from its N(0, 0.01) start: it trained
    assert moved
    for name, value in on_the_fly.head.state_dict().items():
        torch.testing.assert_close(cached.head.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
