"""`bam embed`: a generated image folder through a tiny ViT export, checked against the backbone run
directly on the same files; the output formats read back; two torchrun processes writing the
features that one process writes (the single-process run is the one both process tests read);
bad input in one line."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, v2

import bam
from bam.data.sources import decode_image_file
from bam.evaluation.embed import EMBEDDING_FORMATS, Embeddings, main, read_images, relative_name
from bam.io import export_backbone
from bam.recipe import DataRecipe
from cli_runs import run_bam
from eval_fixtures import VIT, write_checkpoint
from processes import run_process_group
from product_runs import write_image_folder
from repo_paths import REPO

RECIPE = DataRecipe(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), input_size=32, crop_pct=0.8, interpolation="bicubic")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embed")
    return export_backbone(write_checkpoint(folder, *VIT), folder / "export", recipe=RECIPE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """2 classes x 4 JPEGs of uneven sizes, and a file that cannot be read (it gets no row)."""
    root = write_image_folder(tmp_path_factory.mktemp("images")) / "train"
    (root / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def embedded_directly(export: Path, paths: list[Path]) -> torch.Tensor:
    """Class tokens of the backbone on the recipe's view of each file (decoded as bam decodes every
    image): the short side resized to 32 / 0.8 = 40 px (bicubic), a centre crop of 32, the
    recipe's mean and std."""
    model = bam.load_backbone(export)
    view = v2.Compose([v2.Resize(40, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(32),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(RECIPE.mean, RECIPE.std)])
    batch = torch.stack([view(decode_image_file(str(path))) for path in paths])
    with torch.no_grad():
        return model.forward_features(batch)[:, 0]


READABLE = [f"class{label}/{index}.jpg" for label in range(2) for index in range(4)]


COMMON = ["--accelerator", "cpu", "--num_workers", "0", "--batch_size", "3"]


@pytest.fixture(scope="module")
def single(export, images, tmp_path_factory) -> tuple[Path, str]:
    """`bam embed` on one process, with the pictures: its output folder and printed output; read
    by the test of its files and by the 2-process test, which must write the same features."""
    out = tmp_path_factory.mktemp("single") / "out"
    done = run_bam(["embed", "--backbone", str(export), "--images", str(images), "--output_dir", str(out), *COMMON,
                    "--pictures.queries", "2", "--pictures.k", "3", "--pictures.attention_images", "2"])
    assert done.returncode == 0, done.stdout
    return out, done.stdout


@pytest.mark.process
def test_bam_embed_writes_the_backbone_features_with_their_file_names_and_the_pictures(export, images, single):
    out, printed = single
    assert "files: 9 found, 8 read, 1 skipped" in printed
    assert (f"bam embed: 8 images -> 48-d cls features; wrote {out / 'embeddings.pt'}, {out / 'neighbours.png'}, "
            f"{out / 'embedding_map.png'}, {out / 'attention.png'}") in printed
    written = torch.load(out / "embeddings.pt", weights_only=True)
    assert written["filenames"] == READABLE
    assert written["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert written["class_names"] == ["class0", "class1"]
    expected = embedded_directly(export, [images / name for name in READABLE])
    torch.testing.assert_close(written["embeddings"], expected, atol=1e-5, rtol=1e-5)
    assert (out / "skipped_files.tsv").read_text().strip().endswith(str(images / "class1" / "broken.jpg"))
    assert all((out / name).stat().st_size > 0 for name in ("neighbours.png", "embedding_map.png", "attention.png"))
    assert not list(out.glob(".*.tmp"))  # the temporary files were renamed into place


@pytest.mark.process
@pytest.mark.distributed
def test_two_torchrun_processes_write_the_file_one_process_writes(export, images, single, tmp_path):
    """As the single process's run (the `single` fixture's, in the torch format), in the npy format."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'helpers'}", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "bam", "embed", "--backbone", str(export), "--images", str(images), *COMMON, "--format", "npy",
              "--pictures.enabled", "false", "--output_dir", str(tmp_path / "two")]
    double = run_process_group(launch, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    assert double.returncode == 0, double.stdout
    assert double.stdout.count("bam embed: 8 images") == 1  # process 0 alone writes and reports
    one = torch.load(single[0] / "embeddings.pt", weights_only=True)
    rows = "".join(f"{name},{label}\n" for name, label in zip(one["filenames"], one["labels"].tolist()))
    assert (tmp_path / "two" / "filenames.csv").read_text() == "filename,label\n" + rows
    np.testing.assert_allclose(np.load(tmp_path / "two" / "embeddings.npy"), one["embeddings"].numpy(),
                               rtol=1e-6, atol=1e-6)


def test_every_format_reads_back_row_for_row(tmp_path):
    embeddings = Embeddings(torch.tensor([[0.5, -1.25], [3.0, 1e-7]]), ["a/x.jpg", "b/y z.png"],
                            torch.tensor([0, 1]), ["a", "b"])
    written = {name: write(embeddings, tmp_path / name) for name, write in EMBEDDING_FORMATS.items()}
    as_torch = torch.load(written["torch"][0], weights_only=True)
    assert as_torch["filenames"] == embeddings.filenames and as_torch["class_names"] == ["a", "b"]
    assert torch.equal(as_torch["embeddings"], embeddings.features) and as_torch["labels"].tolist() == [0, 1]
    with written["csv"][0].open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["filenames", "embedding_0", "embedding_1", "labels"]  # lightly-embed's columns
    assert rows[1:] == [["a/x.jpg", "0.5", "-1.25", "0"], ["b/y z.png", "3.0", "1.0000000116860974e-07", "1"]]
    array_file, names_file = written["npy"]
    assert np.array_equal(np.load(array_file), embeddings.features.numpy())
    assert names_file.read_text() == "filename,label\na/x.jpg,0\nb/y z.png,1\n"


def test_file_names_are_relative_to_the_folder_or_list_and_absolute_outside_it(tmp_path):
    assert relative_name(str(tmp_path / "photos" / "cat" / "1.jpg"), tmp_path / "photos") == os.path.join("cat", "1.jpg")
    assert relative_name("/elsewhere/2.jpg", tmp_path / "photos") == "/elsewhere/2.jpg"


def test_a_list_file_is_read_as_the_other_stages_read_it(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'class1' / '0.jpg'} 1\n{images / 'class0' / '2.jpg'} 0\n")
    files, class_names = read_images(listing)
    assert files.paths == [str(images / "class1" / "0.jpg"), str(images / "class0" / "2.jpg")]
    assert files.labels.tolist() == [1, 0] and class_names is None


@pytest.mark.parametrize("options, message", [
    (["--images", "no/such/folder"], "bam embed: image folder or list not found: no/such/folder"),
    (["--images", ".", "--format", "parquet"], "bam embed: unknown format 'parquet': choose one of torch, csv, npy"),
])
def test_bad_input_stops_with_one_line(export, options, message):
    with pytest.raises(SystemExit) as stop:
        main(["--backbone", str(export), "--accelerator", "cpu", *options])
    assert str(stop.value.code) == message


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    first = Embeddings(torch.ones(2, 3), ["a.jpg", "b.jpg"], torch.tensor([0, 0]), None)
    EMBEDDING_FORMATS["torch"](first, tmp_path)

    def killed_mid_write(content, file):
        file.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        EMBEDDING_FORMATS["torch"](Embeddings(torch.zeros(5, 3), list("vwxyz"), torch.zeros(5), None), tmp_path)
    monkeypatch.undo()
    kept = torch.load(tmp_path / "embeddings.pt", weights_only=True)
    assert kept["filenames"] == ["a.jpg", "b.jpg"] and torch.equal(kept["embeddings"], torch.ones(2, 3))
    assert [path.name for path in tmp_path.iterdir()] == ["embeddings.pt"]  # no temporary file left
