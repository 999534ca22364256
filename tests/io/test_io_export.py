"""Backbone export: bam Lightning checkpoints and released files to safetensors, and back, exactly."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import bam
from bam.io import CheckpointFormatError, export_backbone, load_backbone, read_backbone
from bam.io import convert as convert_cli
from bam.io import export_cli
from bam.models.backbones import build_backbone
from bam.recipe import DataRecipe
from io_layouts import bam_checkpoint, randomise_buffers, released_args, released_checkpoint

CNN_KWARGS = {"width": 8}
HYPER_PARAMETERS = {"backbone": "bam_cnn4", "backbone_kwargs": CNN_KWARGS, "temperature": 0.1}
MNIST_RECIPE = {"mean": [0.1307] * 3, "std": [0.3081] * 3, "input_size": 28, "crop_pct": 1.0, "interpolation": "bicubic"}
IMAGES = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def features(model: torch.nn.Module, images: torch.Tensor = IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def cnn_pair():
    torch.manual_seed(3)
    return tuple(randomise_buffers(build_backbone("bam_cnn4", **CNN_KWARGS)) for _ in range(2))


@pytest.fixture(scope="module")
def lightning_file(cnn_pair, tmp_path_factory):
    teacher, student = cnn_pair
    path = tmp_path_factory.mktemp("bam") / "last.ckpt"
    torch.save({**bam_checkpoint(student, teacher, HYPER_PARAMETERS), "data_recipe": MNIST_RECIPE}, path)
    return path


def test_export_from_a_bam_checkpoint_round_trips_exactly(cnn_pair, lightning_file, tmp_path):
    teacher, student = cnn_pair
    output = export_backbone(lightning_file, tmp_path / "export")
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_backbone(output)
    assert not loaded.training
    assert torch.equal(features(loaded), features(teacher))
    assert not torch.equal(features(loaded), features(student))
    assert features(teacher).abs().sum() > 0  # the comparison above sees real features
    for name, buffer in teacher.state_dict().items():  # batch-norm statistics too
        assert torch.equal(loaded.state_dict()[name], buffer), name


def test_export_config_is_timms_layout_with_the_recipe(lightning_file, tmp_path):
    config = json.loads((export_backbone(lightning_file, tmp_path) / "config.json").read_text())
    assert config == {
        "architecture": "bam_cnn4",
        "num_features": 32,
        "model_args": {"num_classes": 0, **CNN_KWARGS},
        "pretrained_cfg": {
            "input_size": [3, 28, 28], "mean": pytest.approx(MNIST_RECIPE["mean"]),
            "std": pytest.approx(MNIST_RECIPE["std"]), "crop_pct": 1.0, "crop_mode": "center",
            "interpolation": "bicubic", "num_classes": 0, "first_conv": "features.0", "classifier": "head",
        },
        "bam": {
            "format": "bam-backbone", "format_version": 2, "bam_architecture": "bam_cnn4", "encoder": "teacher",
            "data_recipe_recorded": True, "train_crop_sizes": [], "source": str(lightning_file.resolve()), "source_format": "bam",
            "bam_version": bam.__version__,
        },
    }


def test_student_on_request_and_every_way_of_naming_the_export(cnn_pair, lightning_file, tmp_path):
    _, student = cnn_pair
    output = export_backbone(lightning_file, tmp_path, encoder="student")
    for path in (output, output / "model.safetensors", output / "config.json"):
        assert torch.equal(features(load_backbone(path)), features(student)), path
    message = f"{str(output)!r} is an export of one backbone: encoder= and arch= apply to checkpoints only"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_backbone(output, encoder="teacher")


def test_loading_an_export_unpickles_nothing(lightning_file, tmp_path, monkeypatch):
    output = export_backbone(lightning_file, tmp_path)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))
    load_backbone(output)


def test_load_backbone_reads_checkpoints_directly(cnn_pair, lightning_file):
    teacher, student = cnn_pair
    assert torch.equal(features(load_backbone(lightning_file)), features(teacher))
    assert torch.equal(features(load_backbone(lightning_file, encoder="student")), features(student))


def test_checkpoint_without_teacher(cnn_pair, tmp_path):
    _, student = cnn_pair
    path = tmp_path / "no_teacher.ckpt"
    torch.save(bam_checkpoint(student, None, {"backbone": "bam_cnn4", "backbone_kwargs": CNN_KWARGS}), path)
    output = export_backbone(path, tmp_path / "export")
    config = json.loads((output / "config.json").read_text())
    assert config["bam"]["encoder"] == "student" and not config["bam"]["data_recipe_recorded"]
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]  # no recipe recorded: ImageNet's
    assert config["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert torch.equal(features(load_backbone(output)), features(student))
    with pytest.raises(CheckpointFormatError, match="no teacher backbone"):
        export_backbone(path, tmp_path / "export", encoder="teacher")


def test_an_export_reads_back_with_its_provenance_and_recipe(cnn_pair, lightning_file, tmp_path):
    _, student = cnn_pair
    output = export_backbone(lightning_file, tmp_path / "export", encoder="student")
    spec = read_backbone(output)
    assert (spec.model_name, spec.encoder, spec.source_format, spec.num_classes) == ("bam_cnn4", "student", "bam", 0)
    assert spec.recipe == DataRecipe((0.1307,) * 3, (0.3081,) * 3, 28, crop_pct=1.0, interpolation="bicubic")

    # a folder with timm's fields only (written by another tool): timm's defaults, nothing invented
    config_file = output / "config.json"
    config = json.loads(config_file.read_text())
    del config["bam"], config["pretrained_cfg"], config["model_args"]["num_classes"]
    config_file.write_text(json.dumps(config))
    spec = read_backbone(output)
    assert (spec.encoder, spec.source_format, spec.num_classes, spec.recipe) == ("export", "export", 0, DataRecipe())
    assert torch.equal(features(spec.build()), features(student))


def test_unrecognised_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    message = ("unrecognised checkpoint (top-level keys ['conv.weight']): expected a bam Lightning checkpoint "
               "('state_dict', 'hyper_parameters') or the authors' released file ('model', 'args', ...)")
    with pytest.raises(CheckpointFormatError, match=f"^{re.escape(message)}$"):
        load_backbone(path)


def test_config_is_indented_json_with_the_first_conv_and_classifier_of_the_model(tmp_path):
    # timm reads first_conv and classifier by name to adapt the stem and drop the head
    path = tmp_path / "resnet.ckpt"
    torch.save(bam_checkpoint(build_backbone("resnet10t"), None, {"backbone": "resnet10t"}), path)
    text = (export_backbone(path, tmp_path / "nested" / "dirs" / "export") / "config.json").read_text()
    assert text.startswith('{\n  "architecture": "resnet10t",\n  "num_features": 512,\n')
    config = json.loads(text)
    assert (config["pretrained_cfg"]["first_conv"], config["pretrained_cfg"]["classifier"]) == ("conv1.0", "fc")


def test_first_conv_of_a_model_without_convolutions_is_empty():
    from bam.io.export_writer import _first_conv

    assert _first_conv(torch.nn.Sequential(torch.nn.Linear(3, 3))) == ""


def test_input_channels_and_recipe_given_to_the_export_are_recorded(cnn_pair, tmp_path):
    grey = build_backbone("bam_cnn4", in_chans=1, **CNN_KWARGS)
    path = tmp_path / "grey.ckpt"
    torch.save(bam_checkpoint(grey, None, {"backbone": "bam_cnn4", "backbone_kwargs": {"in_chans": 1, **CNN_KWARGS}}),
               path)
    config = json.loads((export_backbone(path, tmp_path / "default") / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 224, 224]  # the model's channels, ImageNet's size
    recipe = DataRecipe((0.5,), (0.25,), 20, crop_pct=1.0, interpolation="bilinear")
    config = json.loads((export_backbone(path, tmp_path / "export", recipe=recipe) / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 20, 20]
    assert (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]) == ([0.5], [0.25])
    assert read_backbone(tmp_path / "export").recipe == recipe


def test_kwargs_that_json_cannot_hold_are_refused_before_writing(cnn_pair, tmp_path):
    _, student = cnn_pair
    path = tmp_path / "numpy.ckpt"
    torch.save(bam_checkpoint(student, None, {"backbone": "bam_cnn4", "backbone_kwargs": {"width": np.int64(8)}}), path)
    message = ("backbone kwargs {'num_classes': 0, 'width': np.int64(8)} cannot be exported as JSON: "
               "Object of type int64 is not JSON serializable")
    with pytest.raises(CheckpointFormatError, match=f"^{re.escape(message)}$"):
        export_backbone(path, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_incomplete_exports_name_what_is_missing(lightning_file, tmp_path):
    output = export_backbone(lightning_file, tmp_path / "export")
    (output / "config.json").unlink()
    message = f"backbone export file not found: {str(output / 'config.json')!r}"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_backbone(output)

    output = export_backbone(lightning_file, tmp_path / "truncated")
    weights = load_file(output / "model.safetensors")
    save_file({name: value for name, value in weights.items() if name != "features.0.weight"},
              output / "model.safetensors")
    with pytest.raises(RuntimeError, match="features.0.weight"):  # strict: no layer left at random
        load_backbone(output)


@pytest.fixture(scope="module")
def vit_small_pair():
    torch.manual_seed(4)
    return build_backbone("bam_vit_small_patch16_224"), build_backbone("bam_vit_small_patch16_224")


@pytest.fixture(scope="module")
def released_file(vit_small_pair, tmp_path_factory):
    teacher, student = vit_small_pair
    path = tmp_path_factory.mktemp("released") / "checkpoint.pth"
    torch.save(released_checkpoint(student, teacher, released_args("vit_small"), layout="compiled_encoder"), path)
    return path


def test_convert_cli_round_trip(vit_small_pair, released_file, tmp_path, capsys):
    teacher, student = vit_small_pair
    images = torch.randn(2, 3, 32, 32)
    convert_cli.main([str(released_file), "--output", str(tmp_path / "teacher")])
    assert "teacher backbone (vit_small_patch16_224, 384-d features, 0 classes)" in capsys.readouterr().out
    assert torch.equal(features(load_backbone(tmp_path / "teacher"), images), features(teacher, images))

    student_dir = str(tmp_path / "student")
    convert_cli.main([str(released_file), "--output", student_dir, "--encoder", "student", "--arch", "vit_small"])
    loaded = load_backbone(tmp_path / "student")
    assert torch.equal(features(loaded, images), features(student, images))
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["bam"]["source_format"] == "released"
    assert config["architecture"] == "vit_small_patch16_224" and config["model_args"]["num_heads"] == 12


def test_export_cli_round_trip(cnn_pair, lightning_file, tmp_path):
    _, student = cnn_pair
    export_cli.main([str(lightning_file), "--output", str(tmp_path), "--encoder", "student"])
    assert torch.equal(features(load_backbone(tmp_path)), features(student))


def test_the_old_which_option_exports_the_same_encoder_with_one_line(cnn_pair, lightning_file, tmp_path, capsys):
    """`--which` was the name of `--encoder`: command lines written before still export the student."""
    _, student = cnn_pair
    export_cli.main([str(lightning_file), "--output", str(tmp_path), "--which", "student"])
    assert capsys.readouterr().err == (
        "bam export: note: the command line: `which` is now `encoder`; read as encoder=student\n"
    )
    assert torch.equal(features(load_backbone(tmp_path)), features(student))


def test_cli_reports_errors_without_traceback(lightning_file, tmp_path):
    expected = r"^bam convert: error: expected a 'released' checkpoint, but this is a 'bam' one"
    with pytest.raises(SystemExit, match=expected):
        convert_cli.main([str(lightning_file), "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="^bam export: error: checkpoint file not found"):
        export_cli.main([str(tmp_path / "missing.ckpt"), "--output", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written on failure


# `bam export --help` as a user reads it (compared with its whitespace collapsed, and printed for a
# terminal wide enough that argparse wraps no line: it may break one at a hyphen)
EXPORT_HELP = """
usage: bam export [-h] --output OUTPUT [--encoder {teacher,student,ema,model}] [--arch ARCH] checkpoint

Export the backbone of a pretraining checkpoint (bam's Lightning checkpoint or the authors' released file, detected
from its contents) as model.safetensors plus config.json, the layout of timm and the Hugging Face Hub. Fine-tuning
checkpoints (bam finetune) export the whole classifier.

positional arguments:
  checkpoint  checkpoint file to read (loaded weights-only: no code from it runs)

options:
  -h, --help  show this help message and exit
  --output OUTPUT, -o OUTPUT  directory to write model.safetensors and config.json into (created if needed)
  --encoder {teacher,student,ema,model}  pretraining checkpoints: the encoder to export, by default the teacher when the
      checkpoint has one (the published numbers use it), else the student; fine-tuning checkpoints: the EMA of the
      weights (default, when kept) or the model, exported with its classifier
  --arch ARCH  architecture to load the weights into, instead of the one the checkpoint records: one of the authors'
      names ['caformer_m36', 'vit_base/16', 'vit_small/16'] or a timm model name
"""
EXAMPLES = {
    export_cli: """
The export is read back with bam.load_backbone(DIR), which returns a timm model in eval mode, or by
timm itself (after `import bam` for bam's own architectures such as bam_cnn4):
    model = bam.load_backbone("DIR"); features = model(images)  # (N, feature_dim)
    model = timm.create_model("local-dir:DIR", pretrained=True)

examples:
    bam export runs/bam/last.ckpt --output exported/vit_s16
    bam export runs/bam/last.ckpt --output exported/student --encoder student
""",
    convert_cli: """
The architecture comes from the file's args.arch and args.patch_size (caformer_m36, vit_base/16, vit_small/16);
--arch overrides it. The export is read back with bam.load_backbone(DIR) (a timm model in eval mode).

examples:
    bam convert bam_vitb16_checkpoint.pth --output exported/vit_b16
    bam convert checkpoint.pth --output exported/caformer --arch caformer_m36 --encoder student
""",
}
CONVERT_DESCRIPTION = (
    "Convert an authors' released BAM pretraining file (keys model, optimizer, epoch, args, ...) into "
    "model.safetensors plus config.json, the backbone only, matched strictly to its timm architecture."
)


def help_text(cli, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_export_help_is_the_documented_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = help_text(export_cli, capsys)
    assert " ".join(text.split()) == " ".join((EXPORT_HELP + EXAMPLES[export_cli]).split())


@pytest.mark.parametrize("cli", [export_cli, convert_cli])
def test_help_keeps_the_examples_lines_as_written(cli, capsys):
    assert text_ends_with_lines(help_text(cli, capsys), EXAMPLES[cli])


def text_ends_with_lines(text: str, lines: str) -> bool:
    return text.rstrip("\n").endswith(lines.strip("\n"))


def test_convert_help_has_its_own_description_on_one_line(capsys):
    text = help_text(convert_cli, capsys)
    assert text.startswith("usage: bam convert ") and CONVERT_DESCRIPTION in text.splitlines()


@pytest.mark.parametrize("argv, message", [
    (["x.ckpt"], "the following arguments are required: --output/-o"),
    (["x.ckpt", "-o", "out", "--encoder", "best"], "argument --encoder: invalid choice: 'best'"),
])
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_reports_the_export_and_its_recipe(cnn_pair, lightning_file, tmp_path, capsys):
    teacher, student = cnn_pair
    export_cli.main([str(lightning_file), "-o", str(tmp_path / "student"), "--encoder", "student"])
    out = tmp_path / "student"
    assert capsys.readouterr().out == (
        f"bam export: wrote the student backbone (bam_cnn4, 32-d features, 0 classes) to {out / 'model.safetensors'} "
        f"and {out / 'config.json'}; data recipe: 28 px, mean [0.1307, 0.1307, 0.1307], std [0.3081, 0.3081, 0.3081]\n"
    )
    no_recipe = tmp_path / "no_recipe.ckpt"
    torch.save(bam_checkpoint(student, teacher, HYPER_PARAMETERS), no_recipe)
    export_cli.main([str(no_recipe), "-o", str(tmp_path / "teacher")])
    out = tmp_path / "teacher"
    assert capsys.readouterr().out == (
        f"bam export: wrote the teacher backbone (bam_cnn4, 32-d features, 0 classes) to {out / 'model.safetensors'} "
        f"and {out / 'config.json'}; data recipe: 224 px, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] "
        "(the checkpoint records none: ImageNet's defaults)\n"
    )


def test_convert_arch_option_reaches_the_export(vit_small_pair, tmp_path):
    # a released file whose recorded architecture bam does not know converts once --arch names one
    teacher, student = vit_small_pair
    path = tmp_path / "renamed.pth"
    torch.save(released_checkpoint(student, teacher, released_args("vit_renamed")), path)
    with pytest.raises(SystemExit, match="^bam convert: error: .*vit_renamed"):
        convert_cli.main([str(path), "--output", str(tmp_path / "refused")])
    convert_cli.main([str(path), "--output", str(tmp_path / "export"), "--arch", "vit_small"])
    assert torch.equal(features(load_backbone(path, arch="vit_small"), IMAGES[:, :, :16, :16]),
                       features(teacher, IMAGES[:, :, :16, :16]))
    assert torch.equal(features(load_backbone(tmp_path / "export"), IMAGES[:, :, :16, :16]),
                       features(teacher, IMAGES[:, :, :16, :16]))


def test_export_of_a_checkpoint_written_by_bam_module(tmp_path):
    # the real writer: a BAMModule trained one step and saved by Lightning
    import pytorch_lightning as pl

    from bam.methods import BAMModule
    from tiny_runs import TinyCropsDataModule

    module = BAMModule(backbone="bam_cnn4", backbone_kwargs=CNN_KWARGS, num_local_crops=2, momentum_teacher=True,
                       warmup_epochs=0, projector=dict(hidden_dim=16, out_dim=8, num_layers=2))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, TinyCropsDataModule(num_images=8, batch_size=8, num_local=2))
    trainer.save_checkpoint(tmp_path / "bam.ckpt")
    for name, encoder in (("teacher", module.teacher), ("student", module.student)):
        output = export_backbone(tmp_path / "bam.ckpt", tmp_path / name, encoder=name)
        assert torch.equal(features(load_backbone(output)), features(encoder.backbone)), name
    assert not torch.equal(features(module.teacher.backbone), features(module.student.backbone))


def test_the_old_module_path_still_names_reading_writing_and_the_command():
    """Code written when one module held the whole export keeps importing it from `bam.io.export`."""
    from bam.io import backbone_reader, export, export_writer

    assert export.load_backbone is backbone_reader.load_backbone and export.read_backbone is backbone_reader.read_backbone
    assert export.export_backbone is export_writer.export_backbone and export.main is export_cli.main
