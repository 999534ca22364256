"""The projector's settings are one group, `projector` (`bam.models.ProjectorSettings`); the flat
`proj_*` keys they had before still load, from checkpoints written then and from Python code."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from jsonargparse import Namespace

from bam.methods import BAMModule, DINOModule, SwAVModule
from bam.models.projector import SWAV_PROJECTOR, with_projector_gathered
from bam.training.run_cli import changed_settings

TINY = dict(backbone="bam_cnn4", backbone_kwargs=dict(width=8))
HEAD = dict(hidden_dim=16, out_dim=8, num_layers=2, activation="relu", batch_norm=True, last_batch_norm=False,
            bias=True, init="pytorch")
# the same head as checkpoints written before the settings were gathered hold it
FLAT_HEAD = dict(proj_hidden_dim=16, proj_out_dim=8, proj_layers=2, proj_activation="relu", proj_batch_norm=True,
                 proj_last_batch_norm=False, proj_bias=True, proj_init="pytorch")
# how `bam pretrain` (LightningCLI) records the class that Lightning rebuilds on loading
CLI_RECORD = {"_instantiator": "pytorch_lightning.cli.instantiate_module"}


def old_checkpoint(model: pl.LightningModule, written_by: str) -> dict:
    """`model`'s checkpoint as bam wrote it before: the projector's settings flat in `hyper_parameters`."""
    hparams = {key: value for key, value in model.hparams.items() if key != "projector"}
    if written_by == "bam pretrain":
        hparams.update(CLI_RECORD, _class_path=f"{type(model).__module__}.{type(model).__name__}")
    return {"state_dict": model.state_dict(), "hyper_parameters": {**hparams, **FLAT_HEAD},
            "pytorch-lightning_version": pl.__version__}


@pytest.mark.parametrize("written_by", ["python", "bam pretrain"])
@pytest.mark.parametrize("method, extra", [(BAMModule, {}), (SwAVModule, dict(objective=dict(num_prototypes=5))),
                                           (DINOModule, dict(out_dim=12))])
def test_a_checkpoint_with_the_flat_projector_keys_loads_into_the_group(tmp_path, method, extra, written_by):
    torch.manual_seed(0)
    model = method(**TINY, **extra, projector=HEAD)
    path = tmp_path / "old.ckpt"
    torch.save(old_checkpoint(model, written_by), path)
    loaded = method.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams["projector"] == HEAD
    assert not any(key.startswith("proj_") for key in loaded.hparams)
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in state)


def test_a_mapping_or_a_flat_key_changes_only_the_settings_it_names_of_the_methods_defaults():
    by_mapping = SwAVModule(**TINY, projector=dict(out_dim=64)).hparams["projector"]
    by_flat_key = SwAVModule(**TINY, proj_out_dim=64).hparams["projector"]
    assert by_mapping == by_flat_key == {**vars(SWAV_PROJECTOR), "out_dim": 64}
    with pytest.raises(TypeError, match=r"^SwAVModule.__init__\(\) got an unexpected keyword argument 'proj_widht'$"):
        SwAVModule(**TINY, proj_widht=64)
    with pytest.raises(TypeError, match=r"^projector must be a ProjectorSettings, got 64; "):
        SwAVModule(**TINY, projector=64)


def test_resuming_an_old_checkpoint_compares_its_flat_projector_keys_with_the_group():
    stored = with_projector_gathered({"lr": 0.1, **FLAT_HEAD})
    current = Namespace(lr=0.1, projector=Namespace(**{**HEAD, "hidden_dim": 32}))
    assert changed_settings(stored, current) == [("model.projector", HEAD, current.projector)]
