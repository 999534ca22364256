"""What a method does inside a (tiny) run that the schedule and EMA tests do not look at: BAM's
targets are the teacher's embeddings and its objective is the one given, a non-finite loss or state
names the step, the learning rate and the way back, the data module's recipe is what checkpoints
record, SGD gets its momentum, and SwAV's prototypes keep their own undecayed group."""
from __future__ import annotations

import dataclasses

import pytest
import pytorch_lightning as pl
import torch

from bam.losses import BAMObjective, SwAVObjective
from bam.methods import BAMModule, NonFiniteLossError, SwAVModule
from bam.recipe import CHECKPOINT_KEY, DataRecipe
from bam.training.health import NonFiniteStateError
from tiny_runs import TinyCropsDataModule

SMALL_HEAD = dict(projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
RECIPE = DataRecipe(mean=(0.25, 0.5, 0.75), std=(0.5, 0.5, 0.5), input_size=32)


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**settings, **kwargs})


def test_bam_targets_are_the_teachers_embeddings_under_the_given_objective():
    torch.manual_seed(0)
    objective = BAMObjective(reg=0.2, temperature=0.3, top_k=0)
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, objective=objective, **SMALL_HEAD)
    assert model.hparams.objective == dataclasses.asdict(objective)
    assert model.loss_fn.reg == 0.2
    with torch.no_grad():
        for parameter in model.teacher.parameters():  # a teacher that has moved away from the student
            parameter.add_(0.2 * torch.randn_like(parameter))
    crops = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)]
    model.eval()
    with torch.no_grad():
        student = model.student(crops)
        expected = model.loss_fn(student, model.teacher(crops))
        own_targets = model.loss_fn(student, None)
        default_objective = BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD).loss_fn(student, model.teacher(crops))
        loss = model.compute_loss(crops)
    assert not torch.isclose(expected, own_targets) and not torch.isclose(expected, default_objective)
    torch.testing.assert_close(loss, expected)


def test_non_finite_loss_names_its_step_the_lr_and_the_sound_checkpoint(tmp_path):
    data = TinyCropsDataModule(num_images=8, batch_size=4)
    checkpoints = tmp_path / "checkpoints"
    sound = pl.callbacks.ModelCheckpoint(dirpath=checkpoints)
    quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[sound]).fit(
        BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD), data)
    written = next(checkpoints.glob("*.ckpt"))

    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, lr=0.125, **SMALL_HEAD)
    with torch.no_grad():
        model.student.projector[0].weight.fill_(float("nan"))
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=checkpoints)])
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.fit(model, data)
    assert str(stopped.value).startswith("the loss became nan at step 0 (last finite loss: None); stopping")
    assert stopped.value.lr == 0.125
    assert stopped.value.checkpoint is not None and stopped.value.checkpoint.path == written
    assert f"The newest sound checkpoint is {written} (step 2," in str(stopped.value)


def test_a_non_finite_state_is_refused_with_the_lr():
    model = BAMModule(backbone="bam_cnn4", lr=0.125, **SMALL_HEAD)
    with pytest.raises(NonFiniteStateError, match="refusing to write a checkpoint at step 0: non-finite values in w") as refused:
        model.on_save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("inf")])}})
    assert refused.value.lr == 0.125


class RecipeData(TinyCropsDataModule):
    def data_recipe(self) -> DataRecipe:
        return RECIPE


def test_a_run_records_its_data_modules_recipe_and_sgd_gets_its_momentum(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, optimizer="sgd", sgd_momentum=0.5, **SMALL_HEAD)
    model.data_recipe = DataRecipe(mean=(0.1, 0.1, 0.1), std=(0.2, 0.2, 0.2), input_size=16)  # the module's own loses
    assert model.recipe_of_data() == model.data_recipe  # no trainer yet
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(model, RecipeData(num_images=8, batch_size=4))
    assert model.recipe_of_data() == RECIPE
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY] == RECIPE.to_dict()
    assert {group["momentum"] for group in trainer.optimizers[0].param_groups} == {0.5}
    assert "train/loss" in trainer.progress_bar_metrics


def test_swav_keeps_its_objective_logs_the_freeze_and_never_decays_the_prototypes(tmp_path):
    objective = SwAVObjective(num_prototypes=8, temperature=0.2)
    model = SwAVModule(backbone="bam_cnn4", num_local_crops=2, objective=objective, weight_decay=0.5,
                       weight_decay_final=0.5, **SMALL_HEAD)
    assert model.hparams.objective == dataclasses.asdict(objective)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    assert trainer.logged_metrics["train/prototypes_frozen"] == 1.0  # step 0 of a one-epoch freeze
    prototypes = model.loss_fn.prototypes.weight
    group = next(group for group in trainer.optimizers[0].param_groups if any(p is prototypes for p in group["params"]))
    assert group["weight_decay"] == 0.0 and group["initial_weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.5 for g in trainer.optimizers[0].param_groups)


def test_swav_refuses_a_teacher_with_the_whole_reason():
    with pytest.raises(ValueError, match=r"^SwAV has no momentum teacher \(its codes come from the network's own global "
                                         r"crops\); remove momentum_teacher from the SwAVModule arguments$"):
        SwAVModule(backbone="bam_cnn4", momentum_teacher=True, **SMALL_HEAD)
